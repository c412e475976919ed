"""The torch-free checkpoint reader against crafted files: no code runs, no memory outside a storage
is read (docs/bad_input_catalogue.md, F01-F03).

Crafted files have the layout of ``torch.save`` (zip: ``archive/data.pkl`` + ``archive/data/<key>``;
legacy: magic, protocol, sys info, object, storage keys, raw storages). Their pickles are written
opcode by opcode (``_TensorPickle``), exactly as torch writes a state dict, so no torch is needed and
sizes, strides and offsets can lie.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest

from jaxquant.models import efficientnet_lite as eff
from jaxquant.models.efficientnet_lite import TorchFileError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Payload:
    """Unpickling this creates ``path``: the payload of a malicious checkpoint."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    return b"I" + str(n).encode() + b"\n"


def _tuple(items: bytes) -> bytes:
    return b"(" + items + b"t"


def _state_dict_pickle(tensors, legacy=False) -> bytes:
    """``tensors``: name -> (storage key, storage numel, offset, size, stride), float32 storages."""
    out = b"\x80\x02}"
    for name, (key, numel, offset, size, stride) in tensors.items():
        pid = _str("storage") + b"ctorch\nFloatStorage\n" + _str(key) + _str("cpu") + _int(numel)
        if legacy:
            pid += b"N"
        args = (_tuple(pid) + b"Q" + _int(offset) + _tuple(b"".join(map(_int, size)))
                + _tuple(b"".join(map(_int, stride))) + b"\x89"
                + b"ccollections\nOrderedDict\n)R")
        out += _str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + _tuple(args) + b"Rs"
    return out + b"."


def _write_zip(path, data_pkl: bytes, storages: dict[str, np.ndarray]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        for key, arr in storages.items():
            zf.writestr(f"archive/data/{key}", np.ascontiguousarray(arr, "<f4").tobytes())
    return path


def _write_legacy(path, obj_pickle: bytes, storages: dict[str, np.ndarray], head=None):
    head = head if head is not None else [LEGACY_MAGIC, 1001, {"little_endian": True}]
    with open(path, "wb") as f:
        for item in head:
            f.write(item if isinstance(item, bytes) else pickle.dumps(item, protocol=2))
        f.write(obj_pickle)
        f.write(pickle.dumps(list(storages), protocol=2))
        for arr in storages.values():
            f.write(struct.pack("<q", arr.size))
            f.write(np.ascontiguousarray(arr, "<f4").tobytes())
    return path


STORAGE = {"0": np.arange(6, dtype=np.float32)}


@pytest.mark.parametrize("legacy", [False, True])
def test_handwritten_files_read_like_torch_would(tmp_path, legacy):
    """The crafted-file writer is right: honest tensors (a transposed view, an offset) read back."""
    tensors = {"t": ("0", 6, 0, (3, 2), (1, 3)), "tail": ("0", 6, 4, (2,), (1,))}
    pkl = _state_dict_pickle(tensors, legacy)
    path = (_write_legacy if legacy else _write_zip)(tmp_path / "ok.pt", pkl, STORAGE)
    got = eff.read_torch_state_dict(path)
    np.testing.assert_array_equal(got["t"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    np.testing.assert_array_equal(got["tail"], [4.0, 5.0])


# ------------------------------------------------------------------------------ F01 code execution


@pytest.mark.parametrize("where", ["object", "magic", "protocol", "sys_info", "keys"])
def test_F01_legacy_payload_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker), protocol=2)
    head = [LEGACY_MAGIC, 1001, {"little_endian": True}]
    obj = _state_dict_pickle({"t": ("0", 6, 0, (6,), (1,))}, legacy=True)
    path = tmp_path / "evil.pt"
    if where in ("magic", "protocol", "sys_info"):
        head[["magic", "protocol", "sys_info"].index(where)] = evil
        _write_legacy(path, obj, STORAGE, head)
    elif where == "object":
        _write_legacy(path, evil, STORAGE)
    else:  # the storage key list
        with open(path, "wb") as f:
            for item in head:
                f.write(pickle.dumps(item, protocol=2))
            f.write(obj)
            f.write(evil)
    with pytest.raises(TorchFileError, match="torch-free reader does not support"):
        eff.read_torch_state_dict(path)
    assert not marker.exists(), "the checkpoint's payload ran"


def test_F01_zip_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _write_zip(tmp_path / "evil.pt", pickle.dumps({"w": _Payload(marker)}, protocol=2), {})
    with pytest.raises(TorchFileError, match="torch-free reader does not support"):
        eff.read_torch_state_dict(path)
    assert not marker.exists(), "the checkpoint's payload ran"


def test_F01_load_efficientnet_lite0_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(TorchFileError):
        eff.load_efficientnet_lite0(str(path))
    assert not marker.exists(), "the checkpoint's payload ran"


def test_F01_os_system_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(b"\x80\x02cos\nsystem\n" + _str("touch " + str(tmp_path / "pwned")) + b"\x85R.")
    with pytest.raises(TorchFileError, match="os.system"):
        eff.read_torch_state_dict(path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------ F02 bounds


BAD_VIEWS = {
    "size past the end": ("0", 6, 0, (7,), (1,)),
    "offset past the end": ("0", 6, 5, (2,), (1,)),
    "stride past the end": ("0", 6, 0, (2, 3), (4, 1)),
    "huge size": ("0", 6, 0, (2 ** 40,), (1,)),
    "huge stride": ("0", 6, 0, (2,), (2 ** 62,)),
    "expanded view": ("0", 6, 0, (1000, 6), (0, 1)),
}


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_VIEWS))
def test_F02_tensor_outside_its_storage(tmp_path, case, legacy):
    pkl = _state_dict_pickle({"t": BAD_VIEWS[case]}, legacy)
    path = (_write_legacy if legacy else _write_zip)(tmp_path / "bad.pt", pkl, STORAGE)
    with pytest.raises(TorchFileError, match="storage '0'"):
        eff.read_torch_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_F02_storage_shorter_than_its_header(tmp_path, legacy):
    pkl = _state_dict_pickle({"t": ("0", 100, 0, (100,), (1,))}, legacy)
    path = (_write_legacy if legacy else _write_zip)(tmp_path / "bad.pt", pkl, STORAGE)
    if legacy:  # the legacy file's own element count disagrees with the pickle's
        match = "header says 6 elements, pickle 100"
    else:
        match = "storage '0' has 24 bytes, its header says 100"
    with pytest.raises(TorchFileError, match=match):
        eff.read_torch_state_dict(path)


def test_F02_truncated_legacy_storage(tmp_path):
    pkl = _state_dict_pickle({"t": ("0", 6, 0, (6,), (1,))}, legacy=True)
    path = _write_legacy(tmp_path / "bad.pt", pkl, STORAGE)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(TorchFileError, match="truncated inside storage '0'"):
        eff.read_torch_state_dict(path)


@pytest.mark.parametrize("field", ["negative stride", "float size", "storage is a string"])
def test_F02_malformed_rebuild_arguments(tmp_path, field):
    tensors = {"t": ("0", 6, 0, (6,), (1,))}
    pkl = _state_dict_pickle(tensors)
    if field == "negative stride":
        pkl = pkl.replace(b"(I1\nt", b"(I-1\nt")
    elif field == "float size":
        pkl = pkl.replace(b"(I6\nt", b"(F6.0\nt")
    else:  # the rebuild's storage argument is a plain string instead of a persistent storage
        start = pkl.index(b"((")
        pkl = pkl[:start + 1] + _str("storage") + pkl[pkl.index(b"Q", start) + 1:]
    path = _write_zip(tmp_path / "bad.pt", pkl, STORAGE)
    with pytest.raises(TorchFileError):
        eff.read_torch_state_dict(path)


def test_F03_deeply_nested_pickle_is_a_clear_error(tmp_path):
    depth = 200_000  # 200k lists, each appended to the one below: nested 200k deep
    path = _write_zip(tmp_path / "deep.pt", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".", {})
    with pytest.raises(TorchFileError, match="RecursionError"):
        eff.read_torch_state_dict(path)


def test_F03_not_a_state_dict(tmp_path):
    path = _write_zip(tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2), {})
    with pytest.raises(TorchFileError, match="does not hold a state dict.*list"):
        eff.read_torch_state_dict(path)


def test_real_torch_save_still_reads(tmp_path):
    torch = pytest.importorskip("torch")
    t = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)[1:]}
    for legacy in (False, True):
        path = tmp_path / f"{legacy}.pt"
        torch.save(t, path, _use_new_zipfile_serialization=not legacy)
        got = eff.read_torch_state_dict(path)
        for k, v in t.items():
            np.testing.assert_array_equal(got[k], v.numpy())
    assert os.path.getsize(path) > 0
