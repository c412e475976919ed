"""save/read under concurrency, kills, read-only files and crafted bytes (catalogue F04-F07).

A tiny float model keeps these fast: the file layout and the writer are the same for every model.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from flax import nnx

from jaxquant import serialization
from jaxquant.serialization import CheckpointError, read_checkpoint, save
from testkit.threads import run_in_threads


def _model(seed: int) -> nnx.Module:
    return nnx.Linear(3, 2, rngs=nnx.Rngs(seed))


def _tag(path) -> int:
    """Which writer produced the (valid) file at ``path``."""
    return read_checkpoint(path).header["metadata"]["writer"]


def _leftovers(directory):
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


# ------------------------------------------------------------------------------------ F04 concurrency


def test_F04_concurrent_thread_saves_leave_one_complete_file(tmp_path):
    path = tmp_path / "m.jq"
    save(path, _model(0), metadata={"writer": -1})
    models = [_model(i) for i in range(4)]
    def writer(i):
        for _ in range(15):
            save(path, models[i], metadata={"writer": i})

    assert run_in_threads(writer, 4) == []
    tag = _tag(path)
    assert tag in range(4)
    np.testing.assert_array_equal(read_checkpoint(path).arrays["kernel"], np.asarray(models[tag].kernel[...]))
    assert _leftovers(tmp_path) == []


_CHILD = textwrap.dedent("""
    import sys
    from flax import nnx
    from jaxquant.serialization import save
    path, writer, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = nnx.Linear({width}, 64, rngs=nnx.Rngs(writer))
    print("ready", flush=True)
    for _ in range(rounds):
        save(path, model, metadata={{"writer": writer}})
""")


def _spawn(path, writer, rounds, width=64):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", _CHILD.format(width=width), str(path), str(writer),
                             str(rounds)], stdout=subprocess.PIPE, env=env, text=True)


@pytest.mark.slow
def test_F04_concurrent_process_saves_leave_one_complete_file(tmp_path):
    path = tmp_path / "m.jq"
    save(path, _model(0), metadata={"writer": -1})
    procs = [_spawn(path, i, 30) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    assert _tag(path) in range(3)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_F05_kill_during_saves_keeps_a_valid_file(tmp_path):
    path = tmp_path / "m.jq"
    save(path, _model(0), metadata={"writer": -1})
    # 4 MB checkpoints, saved in a loop, killed at several moments: each time the file under
    # ``path`` must be a complete checkpoint (the old or a new one), never a partial one.
    for delay in (0.0, 0.05, 0.2):
        proc = _spawn(path, 7, 10_000, width=16384)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _tag(path) in (-1, 7)
    # A killed writer may leave its own hidden temporary file, never a damaged 'm.jq'.
    assert all(name.startswith(".m.jq.") for name in _leftovers(tmp_path))


def test_F04_save_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save(tmp_path / "m.jq", _model(0))
    assert synced == [False, True], "expected fsync of the file, then of its directory"


def test_F04_failed_write_keeps_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.jq"
    save(path, _model(0), metadata={"writer": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save(path, _model(1), metadata={"writer": 2})
    monkeypatch.undo()
    assert _tag(path) == 1
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ F06 read-only


def test_F06_save_refuses_a_read_only_file(tmp_path):
    path = tmp_path / "m.jq"
    save(path, _model(0), metadata={"writer": 1})
    os.chmod(path, 0o444)
    before = path.read_bytes()
    with pytest.raises(PermissionError, match="read-only.*chmod u\\+w"):
        save(path, _model(1), metadata={"writer": 2})
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_save_keeps_the_replaced_file_mode(tmp_path):
    path = tmp_path / "m.jq"
    save(path, _model(0))
    os.chmod(path, 0o640)
    save(path, _model(1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_save_refuses_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        save(tmp_path, _model(0))


# ------------------------------------------------------------------------------------ F07 crafted bytes


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "m.jq"
    save(path, _model(0), metadata={"writer": 0})
    return path.read_bytes()


def _read(tmp_path, data: bytes):
    path = tmp_path / "x.jq"
    path.write_bytes(data)
    return read_checkpoint(path)


@pytest.mark.parametrize("length", [0, 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1])
def test_F07_flipped_header_length_is_a_checksum_failure(tmp_path, blob, length):
    data = bytearray(blob)
    struct.pack_into("<Q", data, 12, length)
    with pytest.raises(CheckpointError, match="checksum"):
        _read(tmp_path, bytes(data))


def test_F07_fuzzed_bytes_always_raise_checkpoint_error(tmp_path, blob):
    rng = np.random.default_rng(0)
    positions = list(range(0, min(len(blob), 120))) + list(rng.integers(0, len(blob), 150))
    for pos in positions:
        for mask in (0x01, 0x80):
            data = bytearray(blob)
            data[pos] ^= mask
            with pytest.raises(CheckpointError):
                _read(tmp_path, bytes(data))
    for cut in rng.integers(0, len(blob), 40):
        with pytest.raises(CheckpointError):
            _read(tmp_path, blob[:cut])


def _with_header(blob: bytes, edit) -> bytes:
    """Re-serialise with an edited header and a *valid* checksum: what a crafted file looks like."""
    (hlen,) = struct.unpack_from("<Q", blob, 12)
    header = json.loads(blob[20:20 + hlen])
    data = blob[20 + hlen:-32]
    header = edit(header)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = blob[:12] + struct.pack("<Q", len(raw)) + raw + data
    return body + hashlib.sha256(body).digest()


def _set(key, value):
    def edit(h):
        h[key] = value
        return h
    return edit


def _set_array(key, value):
    def edit(h):
        h["arrays"][0][key] = value
        return h
    return edit


CRAFTED = {
    "header is a list": lambda h: [1, 2],
    "not JSON": lambda h: b"\xff\xfe{",
    "deep nesting": lambda h: b"[" * 100_000 + b"]" * 100_000,
    "no data_nbytes": lambda h: {k: v for k, v in h.items() if k != "data_nbytes"},
    "data_nbytes a string": _set("data_nbytes", "64"),
    "data_nbytes negative": _set("data_nbytes", -64),
    "arrays a dict": _set("arrays", {"a": 1}),
    "array entry a number": _set("arrays", [3]),
    "array without path": lambda h: {**h, "arrays": [{"dtype": "float32"}]},
    "shape negative": _set_array("shape", [-1, 2]),
    "shape of strings": _set_array("shape", ["3", "2"]),
    "shape huge": _set_array("shape", [2 ** 62, 2 ** 62]),
    "offset float": _set_array("offset", 1.5),
    "duplicate path": lambda h: {**h, "arrays": h["arrays"] + h["arrays"][:1]},
    "modules a list": _set("modules", []),
    "module without type": lambda h: {**h, "modules": {"": {"static": {}}}},
    "module static a list": lambda h: {**h, "modules": {"": {"type": "x", "static": []}}},
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_F07_crafted_header_raises_checkpoint_error(tmp_path, blob, case):
    with pytest.raises(CheckpointError, match="header"):
        _read(tmp_path, _with_header(blob, CRAFTED[case]))


def test_F07_crafted_header_through_load(tmp_path, blob):
    """``load`` compares module entries with the template: a crafted one must not surface as KeyError."""
    path = tmp_path / "x.jq"
    path.write_bytes(_with_header(blob, lambda h: {**h, "modules": {"": {"type": "x"}}}))
    with pytest.raises(CheckpointError, match="module ''"):
        serialization.load(path, _model(1))
