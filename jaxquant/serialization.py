"""Saving and loading quantized (or float) NNX models in a documented, non-executable file format.

A ``.jq`` checkpoint is one file, little-endian throughout::

    offset 0   8 bytes  magic  b"JAXQUANT"
    offset 8   uint32   format version (FORMAT_VERSION)
    offset 12  uint64   H = length of the JSON header in bytes
    offset 20  H bytes  UTF-8 JSON header (below)
    then       D bytes  raw array data; each array starts at a 64-byte aligned offset (relative to
                        the start of this section), C order, the dtype's little-endian bytes
    then       32 bytes SHA-256 of every byte before it

The header holds ``format``, ``format_version``, ``jaxquant_version``, ``model_type``,
``data_nbytes``, ``arrays`` (one entry per array: ``path``, ``dtype``, ``shape``, ``offset``,
``nbytes``), ``modules`` (every module path with its type and its static configuration: dtypes,
qschemes, strides, ``relu`` flags, ...; ``qconfig`` as text where a module still holds one),
``qconfig`` (the text of the QConfig/QConfigMapping the caller passed, for people to read) and
``metadata`` (the caller's JSON-able dict). Nothing in the file is ever executed: there is no pickle.

What is saved are the arrays that define the model (``jaxquant.tools.size.model_arrays``: int8
weights, scales, zero points, biases, static activation qparams, float parameters, BatchNorm
statistics, observer state). ``QuantCache`` arrays (packed weight layouts) are not saved: ``load``
rebuilds them from the loaded int8 weights with :func:`rebuild_cache`.

Loading needs a template model of the same architecture: build the float model, then
``prepare``/``convert`` it as when it was saved (any calibration data will do, as the loaded arrays
replace the template's; :func:`converted_template` does that with a synthetic batch).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import secrets
import stat
import struct
from typing import Any, Callable, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.dtypes import FloatDType, QDType, QScheme
from jaxquant.graph import GraphQuantizationError, QuantizedProgram, program_from_record, program_record
from jaxquant.graph.record import RECORD_FORMAT
from jaxquant.module_paths import copy_model, named_modules, replace_contents, set_submodule
from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.nn.variables import CachedLayer, QuantCache
from jaxquant.tools.size import _leaves, model_arrays
from jaxquant.transforms import calibrate, convert
from jaxquant.version import __version__

MAGIC = b"JAXQUANT"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")
_CHECKSUM_BYTES = 32
_ALIGN = 64
# Only plain numeric dtypes: an object/void dtype in a header is refused before any byte is read.
_ALLOWED_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                   "float16", "bfloat16", "float32", "float64")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is damaged, of another format version, or does not fit the target model."""


# ----------------------------------------------------------------------------------------------
# What is saved


def _jsonable(value: Any) -> Any:
    """``value`` as JSON if it is plain static configuration; ``_SKIP`` otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (QDType, QScheme, FloatDType)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [_jsonable(v) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else items
    return _SKIP


_SKIP = object()


def _module_static(module: nnx.Module) -> dict[str, Any]:
    static = {}
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or isinstance(value, (nnx.Variable, nnx.Module, jax.Array, np.ndarray)):
            continue
        encoded = _jsonable(value)
        if encoded is not _SKIP:
            static[name] = encoded
    return static


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def describe_modules(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """``{path: {"type": ..., "static": {...}}}`` for every module: the structure a checkpoint checks."""
    described = {}
    for path, module in named_modules(model):
        entry = {"type": _type_name(module), "static": _module_static(module)}
        qconfig = vars(module).get("qconfig")
        if qconfig is not None:
            entry["qconfig"] = repr(qconfig)
        described[path] = entry
    return described


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _ALLOWED_DTYPES:
        raise TypeError(f"cannot save an array of dtype {name}; supported: {', '.join(_ALLOWED_DTYPES)}")
    return name


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def save(path: PathLike, model: Any, *, qconfig: Any = None,
         metadata: Optional[dict[str, Any]] = None) -> int:
    """Write ``model``'s defining arrays and structure to ``path`` (format described in this module).

    Args:
      path: file to write (conventionally ``*.jq``); written with :func:`write_atomic` (a unique
        temporary file in the same directory, fsync, atomic rename), so concurrent saves and a crash
        at any moment leave either the previous checkpoint or the new one under ``path``. A
        read-only ``path`` is refused with ``PermissionError``, as ``torch.save`` does.
      model: any NNX model; typically an int8 model from ``convert`` (int8 weights are stored as
        int8, scales float32, zero points int32). Or a graph-mode int8 program
        (``jq.graph.convert`` / ``quantize_dynamic`` / ``quantize_weight_only``): its unpacked int8
        weights, qparams and float values, plus which ops were quantized (header ``graph``); load it
        with ``jq.load(path, fn_or_model, example_args)``.
      qconfig: optional QConfig/QConfigMapping used to build the model; stored as text for people.
      metadata: optional JSON-serialisable dict stored in the header.
    Returns:
      The number of bytes written.
    """
    if isinstance(model, QuantizedProgram):
        return _save_graph_program(path, model, qconfig, metadata)
    arrays = model_arrays(model)
    entries, data_nbytes = _layout(arrays)
    header = {
        "format": "jaxquant.checkpoint",
        "format_version": FORMAT_VERSION,
        "jaxquant_version": __version__,
        "model_type": _type_name(model),
        "data_nbytes": data_nbytes,
        "arrays": entries,
        "modules": describe_modules(model),
        "qconfig": None if qconfig is None else repr(qconfig),
        "metadata": metadata or {},
    }
    return _write_file(path, header, entries, arrays)


def _layout(arrays: dict) -> tuple[list, int]:
    """Header entries placing each array at an aligned offset of the data block, and its size."""
    entries, offset = [], 0
    for name, array in arrays.items():
        offset = _align(offset)
        entries.append({"path": name, "dtype": _dtype_name(array.dtype), "shape": list(array.shape),
                        "offset": offset, "nbytes": int(array.nbytes)})
        offset += array.nbytes
    return entries, _align(offset)


def _write_file(path: PathLike, header: dict, entries: list, arrays: dict) -> int:
    data_nbytes = header["data_nbytes"]
    try:
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    except TypeError as e:
        raise TypeError(f"save: metadata must be JSON-serialisable ({e})") from None
    data = bytearray(data_nbytes)
    for entry, array in zip(entries, arrays.values()):
        # np.ascontiguousarray would turn a 0-d array into 1-d; tobytes() is C order already.
        raw = np.asarray(array).astype(np.dtype(array.dtype).newbyteorder("<"), copy=False).tobytes(order="C")
        data[entry["offset"]:entry["offset"] + entry["nbytes"]] = raw
    body = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + bytes(data)
    digest = hashlib.sha256(body).digest()
    write_atomic(path, (body, digest))
    return len(body) + len(digest)


def _save_graph_program(path: PathLike, program: Any, qconfig: Any, metadata: Optional[dict]) -> int:
    """A graph-mode int8 program: the same container; the header's ``graph`` says which ops were
    quantized and how, the arrays are its unpacked int8 weights, qparams and float values."""
    record, arrays = program_record(program)
    entries, data_nbytes = _layout(arrays)
    header = {"format": RECORD_FORMAT, "format_version": FORMAT_VERSION, "jaxquant_version": __version__,
              "model_type": "jaxquant.graph.QuantizedProgram", "data_nbytes": data_nbytes, "arrays": entries,
              "modules": {}, "graph": record, "qconfig": None if qconfig is None else repr(qconfig),
              "metadata": metadata or {}}
    return _write_file(path, header, entries, arrays)


def _load_graph_program(checkpoint: Checkpoint, where: str, fn_or_model: Any, example_args: Any,
                        params_argnums: int) -> Any:
    if example_args is None:
        raise CheckpointError(f"{where} holds a graph-mode int8 program; load it with "
                              "jq.load(path, fn_or_model, example_args=...) giving the function (or NNX model) "
                              "and example arguments it was converted from")
    try:
        return program_from_record(checkpoint.header.get("graph"), checkpoint.arrays, fn_or_model, example_args,
                                   params_argnums=params_argnums)
    except GraphQuantizationError as e:
        raise CheckpointError(f"{where} does not fit this function: {e}") from None


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that ``path`` always holds either its previous contents or all
    of the new ones, whatever the interleaving of concurrent writers or a kill at any moment.

    The bytes go to a new uniquely named file in the same directory (``.<name>.<random>.tmp``,
    created exclusively), which is flushed and fsync-ed, then renamed over ``path`` (atomic on
    POSIX), then the directory is fsync-ed so the rename itself survives a power loss. Concurrent
    writers never share a temporary file; the last rename wins. A write that fails removes its
    temporary file; a killed process may leave one behind (never under ``path``).

    Raises:
      PermissionError: ``path`` exists and is read-only (as ``torch.save`` refuses: open for
        writing fails), even for root; make it writable (``chmod u+w``) to replace it.
      IsADirectoryError: ``path`` is a directory.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    mode = 0o666  # reduced by the umask, as open() would
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(errno.EISDIR, "save: the target is a directory; give a file name", path)
        # Mode bits, not os.access: root may write anything, yet a read-only checkpoint is a user's
        # "do not overwrite" and torch.save refuses it.
        if not existing.st_mode & 0o222 or not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "save: the file is read-only; refusing to replace it "
                                  "(make it writable with chmod u+w, or save under another name)", path)
        mode = stat.S_IMODE(existing.st_mode)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if existing is not None:
            os.chmod(tmp, mode)  # the umask applied at creation; keep the replaced file's mode exactly
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


# ----------------------------------------------------------------------------------------------
# Reading and checking a file


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and verified: its header and its arrays (numpy, keyed by dotted path)."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read and verify ``path`` (magic, version, size, SHA-256, header); raises ``CheckpointError``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    return _parse(blob, path)


def _header_error(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"'{where}' has a malformed header: {what}; the file was not written by "
                           "jaxquant.save or was edited")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header(header: Any, where: str) -> None:
    """Every field ``_parse``/``check_compatible`` read, checked for type and range, so a crafted
    header (even one with a valid checksum) gives ``CheckpointError`` and never a KeyError."""
    if not isinstance(header, dict):
        raise _header_error(where, f"a JSON {type(header).__name__}, expected an object")
    for key, kind in (("data_nbytes", int), ("arrays", list), ("modules", dict)):
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise _header_error(where, f"'{key}' is missing or not a {kind.__name__}")
    if not _is_count(header["data_nbytes"]):
        raise _header_error(where, f"data_nbytes {header['data_nbytes']} is negative")
    seen = set()
    for i, entry in enumerate(header["arrays"]):
        if not isinstance(entry, dict):
            raise _header_error(where, f"arrays[{i}] is not an object")
        if not isinstance(entry.get("path"), str) or not isinstance(entry.get("dtype"), str):
            raise _header_error(where, f"arrays[{i}] needs string 'path' and 'dtype'")
        if entry["path"] in seen:
            raise _header_error(where, f"array '{entry['path']}' appears twice")
        seen.add(entry["path"])
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(map(_is_count, shape)):
            raise _header_error(where, f"array '{entry['path']}' has shape {shape!r:.80}, expected a "
                                       "list of at most 32 non-negative integers")
        if not _is_count(entry.get("offset")) or not _is_count(entry.get("nbytes")):
            raise _header_error(where, f"array '{entry['path']}' needs non-negative integer 'offset' "
                                       "and 'nbytes'")
    for path, entry in header["modules"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("type"), str)
                and isinstance(entry.get("static"), dict)):
            raise _header_error(where, f"module '{path}' needs a string 'type' and an object 'static'")


def _parse(blob: bytes, where: str) -> Checkpoint:
    if len(blob) < _PREAMBLE.size + _CHECKSUM_BYTES:
        raise CheckpointError(f"'{where}' is truncated or not a jaxquant checkpoint ({len(blob)} bytes)")
    magic, version, header_len = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CheckpointError(f"'{where}' is not a jaxquant checkpoint (magic {magic!r}, expected {MAGIC!r})")
    wrong_version = CheckpointError(
        f"'{where}' has checkpoint format version {version}; this jaxquant reads version "
        f"{FORMAT_VERSION}: load it with the jaxquant that wrote it and re-save")
    # The checksum covers every byte before it and sits at the very end, so it is verified before
    # anything in the header is believed: a flipped header length reads as corruption, not as
    # truncation, and a damaged header never reaches the JSON parser.
    body, digest = memoryview(blob)[:-_CHECKSUM_BYTES], blob[-_CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        if version != FORMAT_VERSION:  # another version may place its checksum elsewhere
            raise wrong_version
        raise CheckpointError(f"'{where}' is corrupt or truncated: its SHA-256 checksum does not match "
                              "its contents; restore it from a backup or save it again")
    if version != FORMAT_VERSION:
        raise wrong_version
    header_end = _PREAMBLE.size + header_len
    if header_end + _CHECKSUM_BYTES > len(blob):
        raise CheckpointError(f"'{where}' is inconsistent: the header alone needs {header_end} bytes, "
                              f"the file has {len(blob)}")
    try:
        header = json.loads(bytes(blob[_PREAMBLE.size:header_end]).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"'{where}' has a corrupt header ({type(e).__name__}: {e})") from None
    _check_header(header, where)
    data_nbytes = header["data_nbytes"]
    expected = header_end + data_nbytes + _CHECKSUM_BYTES
    if len(blob) != expected:
        raise CheckpointError(f"'{where}' is inconsistent: {len(blob)} bytes, the header says {expected}")
    if header.get("format_version") != version:
        raise CheckpointError(f"'{where}': header format_version {header.get('format_version')} "
                              f"disagrees with the file's version {version}")
    data = memoryview(blob)[header_end:header_end + data_nbytes]
    arrays = {}
    for entry in header["arrays"]:
        name, dtype_name = entry["path"], entry["dtype"]
        if dtype_name not in _ALLOWED_DTYPES:
            raise CheckpointError(f"'{where}': array '{name}' has unsupported dtype {dtype_name!r}")
        dtype = np.dtype(jnp.dtype(dtype_name)).newbyteorder("<")
        shape = tuple(entry["shape"])
        start, nbytes = entry["offset"], entry["nbytes"]
        # Python ints: a crafted shape cannot overflow the product.
        if nbytes != math.prod(shape) * dtype.itemsize or start + nbytes > data_nbytes:
            raise CheckpointError(f"'{where}': array '{name}' ({dtype_name}{list(shape)}) does not fit "
                                  f"its byte range [{start}, {start + nbytes})")
        arrays[name] = np.frombuffer(data[start:start + nbytes], dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="), copy=True)
    return Checkpoint(header, arrays)


# ----------------------------------------------------------------------------------------------
# Loading into a template


def check_compatible(checkpoint: Checkpoint, model: nnx.Module, where: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` listing every difference between ``checkpoint`` and ``model``'s
    structure: module paths and types, static configuration, array paths, shapes and dtypes."""
    problems = []
    saved_modules = checkpoint.header.get("modules", {})
    model_modules = describe_modules(model)
    for path in sorted(set(saved_modules) - set(model_modules)):
        problems.append(f"module '{path}' ({saved_modules[path]['type']}) is in the checkpoint, not in the model")
    for path in sorted(set(model_modules) - set(saved_modules)):
        problems.append(f"module '{path}' ({model_modules[path]['type']}) is in the model, not in the checkpoint")
    for path in sorted(set(saved_modules) & set(model_modules)):
        saved, ours = saved_modules[path], model_modules[path]
        if saved["type"] != ours["type"]:
            problems.append(f"module '{path}' is a {saved['type']} in the checkpoint, a {ours['type']} in the model")
            continue
        for key in sorted(set(saved["static"]) | set(ours["static"])):
            a, b = saved["static"].get(key, "<absent>"), ours["static"].get(key, "<absent>")
            if a != b:
                problems.append(f"module '{path}': {key} = {a!r} in the checkpoint, {b!r} in the model")
    template = model_arrays(model)
    for name in sorted(set(checkpoint.arrays) - set(template)):
        problems.append(f"array '{name}' is in the checkpoint, not in the model (unexpected key)")
    for name in sorted(set(template) - set(checkpoint.arrays)):
        problems.append(f"array '{name}' is in the model, not in the checkpoint (missing key)")
    for name in sorted(set(template) & set(checkpoint.arrays)):
        saved, ours = checkpoint.arrays[name], template[name]
        if saved.shape != ours.shape and not _qparams_of_old_rank(name, saved.shape, ours.shape):
            problems.append(f"array '{name}': shape {list(saved.shape)} in the checkpoint, {list(ours.shape)} in the model")
        if saved.dtype != ours.dtype:
            problems.append(f"array '{name}': dtype {saved.dtype.name} in the checkpoint, {ours.dtype.name} in the model")
    if problems:
        shown = "\n  ".join(problems[:20]) + ("" if len(problems) <= 20 else f"\n  ... and {len(problems) - 20} more")
        raise CheckpointError(f"{where} does not fit this model ({len(problems)} difference(s)); build the "
                              f"template the same way as the saved model (same architecture, fusion, qconfig):\n  {shown}")


def _qparams_of_old_rank(name: str, saved: tuple, ours: tuple) -> bool:
    """A QTensor's ``()`` / ``(C,)`` scale or zero point as files written before QTensor qparams took
    the data's rank hold them: the same entries, only the size-1 axes differ (reshaped on load)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("scale", "zero_point") and tuple(d for d in saved if d != 1) == tuple(d for d in ours if d != 1)


def _assign_arrays(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
    state = nnx.state(model, nnx.All(nnx.Not(QuantCache), nnx.Not(nnx.RngState)))
    for path, variable in state.flat_state():
        prefix = ".".join(map(str, path))
        value = variable.get_value()
        flat, treedef = jax.tree_util.tree_flatten(value)
        if not flat:
            continue
        names = [prefix + sub for sub, _ in _leaves(value)]
        # reshaped to the template's leaves: check_compatible let through only qparams of the old rank
        loaded = [jnp.asarray(arrays[n]).reshape(np.shape(leaf)) for n, leaf in zip(names, flat)]
        variable.set_value(jax.tree_util.tree_unflatten(treedef, loaded))
    nnx.update(model, state)


def _holds_cache(module: nnx.Module) -> bool:
    return any(isinstance(v, QuantCache) for v in vars(module).values())


def rebuild_cache(model: nnx.Module) -> nnx.Module:
    """Recompute every ``QuantCache`` (packed weights, column sums) of ``model`` from its
    ``QuantParams``, in place; returns ``model``.

    Every module class that holds a ``QuantCache`` has a ``rebuild_cache()`` method returning the
    module rebuilt from its ``QuantParams``; a module holding one without that method raises
    ``TypeError`` (the loaded arrays would otherwise disagree with the cache).
    """
    for path, module in sorted(named_modules(model), key=lambda item: -item[0].count(".")):
        if not _holds_cache(module):
            continue
        if isinstance(module, CachedLayer):
            rebuilt = module.rebuild_cache()
        else:
            raise TypeError(f"'{path}': {type(module).__qualname__} holds a QuantCache but jaxquant does not "
                            "know how to rebuild it; give the class a rebuild_cache() method")
        if path == "":
            replace_contents(model, rebuilt)
        else:
            set_submodule(model, path, rebuilt)
    return model


def load(path: PathLike, model_or_template: Any, example_args: Any = None, *, inplace: bool = True,
         params_argnums: int = 0) -> Any:
    """Load a checkpoint written by :func:`save` into a model of the same architecture.

    Args:
      path: the checkpoint file.
      model_or_template: a model built the same way as the saved one (for a static int8 model: the
        float model after the same fusion, ``prepare`` and ``convert``, see :func:`converted_template`;
        for a dynamic one: the float architecture, any weights, through the same ``quantize_dynamic``).
      inplace: put the arrays into ``model_or_template`` itself (default) or into a copy.
      example_args: only for a graph-mode program (``jq.save(path, qprog)``): then ``model_or_template``
        is the function (or NNX model) it was converted from and ``example_args`` the example arguments
        (``(params, x)``, or ``x`` for a model); the program is re-captured from them and its structure
        checked against the file (``params_argnums`` as for ``jq.graph.prepare``). Returns a
        ``jq.graph.QuantizedProgram``.
    Returns:
      The model holding the checkpoint's arrays (bit-exact), with its ``QuantCache`` rebuilt.
    Raises:
      CheckpointError: the file is truncated, corrupt (checksum), of another format version, or its
        module paths/types, static configuration, array paths, shapes or dtypes differ from the
        model's. The model is left untouched in every failure.
    """
    checkpoint = read_checkpoint(path)

    if checkpoint.header.get("format") == RECORD_FORMAT:
        return _load_graph_program(checkpoint, f"'{os.fspath(path)}'", model_or_template, example_args,
                                   params_argnums)
    if not isinstance(model_or_template, nnx.Module):
        raise CheckpointError(f"'{os.fspath(path)}' holds an NNX model checkpoint; pass a template nnx.Module "
                              f"built the same way, not a {type(model_or_template).__name__}")
    check_compatible(checkpoint, model_or_template, where=f"'{os.fspath(path)}'")
    result = copy_model(model_or_template)
    _assign_arrays(result, checkpoint.arrays)
    rebuild_cache(result)
    if inplace:
        replace_contents(model_or_template, result)
        return model_or_template
    return result


def converted_template(prepared_model: nnx.Module, example_input: Any,
                       forward: Optional[Callable[[nnx.Module, Any], Any]] = None) -> nnx.Module:
    """An int8 model to load a checkpoint into, without real calibration data or training.

    Runs ``prepared_model`` (the output of ``prepare`` or ``prepare_qat``; not modified) once on
    ``example_input`` (a batch of the right shape; random values are fine: every array is replaced on
    load) and converts it. A QAT model runs that batch in training mode, so its fake quants observe
    it, then is switched to eval mode. ``forward(model, batch)`` defaults to ``model(batch)``.
    """
    prepared = copy_model(prepared_model)
    run = forward or (lambda m, b: m(b))
    if any(isinstance(m, FakeQuantModule) for _, m in named_modules(prepared)):
        prepared.train()
        run(prepared, example_input)
        prepared.eval()
    else:
        calibrate(prepared, [example_input], run, progress=False)
    return convert(prepared)
