"""Loading and saving ONNX files: clear errors, external data over 2 GB, atomic writes."""

from __future__ import annotations

import math
import os
from pathlib import Path

from mixrank.core import MixrankError, atomic_write

TWO_GB = 2**31 - 1
# Protobuf cannot serialise a message over 2 GB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def load_onnx(path: str | os.PathLike):
    """Load an ONNX model with its external data.

    Raises:
        MixrankError: missing file, not ONNX, corrupt or truncated, external data
            file missing.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MixrankError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise MixrankError(f"{path} is not a readable ONNX model (corrupt or truncated?): {e}") from None
    if not model.graph.node and not model.graph.initializer:
        raise MixrankError(f"{path} is not an ONNX model (it parses to an empty graph)")
    missing = {str(path.parent / (loc or "?")) for loc in _data_locations(model)
               if loc is None or not (path.parent / loc).is_file()}
    if missing:
        raise MixrankError(
            f"{path} keeps its weights in external data file(s) that are missing: "
            f"{', '.join(sorted(missing))}; copy them next to the .onnx file"
        )
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise MixrankError(f"cannot read the external data of {path}: {e}") from None
    check_tensor_sizes(model, str(path))
    return model


# the typed field that holds each data type's values when raw_data is empty (onnx.proto)
_FIELDS = {1: "float_data", 2: "int32_data", 3: "int32_data", 4: "int32_data", 5: "int32_data", 6: "int32_data",
           7: "int64_data", 9: "int32_data", 10: "int32_data", 11: "double_data", 12: "uint64_data",
           13: "uint64_data", 16: "int32_data"}
_PACKED = {21: 2, 22: 2, 23: 2}  # uint4, int4, float4e2m1: two values per byte


def check_tensor_sizes(model, where: str) -> None:
    """Refuse a tensor whose declared shape and stored data disagree: a negative dimension,
    raw bytes that are not shape × element size (truncated, or a huge declared shape over a
    few bytes), or a typed value list of the wrong length. onnx's own loader accepts these,
    and a reader of the tensor then fails far from the cause.

    Raises:
        MixrankError: names the tensor, its declared shape and what it holds.
    """
    from onnx import helper
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        dims = list(t.dims)
        if any(d < 0 for d in dims):
            raise MixrankError(f"{where}: tensor {t.name!r} declares a negative dimension {dims}")
        count = math.prod(dims)
        if t.data_type in (0, 8):  # undefined, strings: nothing to count in bytes
            continue
        if t.HasField("raw_data") or not any(len(getattr(t, f)) for f in set(_FIELDS.values())):
            try:
                item = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:  # a data type onnx does not know
                raise MixrankError(f"{where}: tensor {t.name!r} has an unknown data type {t.data_type}") from None
            want = -(-count // _PACKED[t.data_type]) if t.data_type in _PACKED else count * item
            if len(t.raw_data) != want:
                raise MixrankError(f"{where}: tensor {t.name!r} declares shape {dims} ({want:,} bytes) but holds "
                                   f"{len(t.raw_data):,} bytes (truncated or forged)")
        else:
            field = _FIELDS.get(t.data_type)
            have = len(getattr(t, field)) if field else count
            want = 2 * count if t.data_type in (14, 15) else count  # complex: two values each
            if have != want:
                raise MixrankError(f"{where}: tensor {t.name!r} declares shape {dims} ({want:,} values) but holds "
                                   f"{have:,}")


def _data_locations(model) -> list[str | None]:
    """The ``location`` of every tensor the model keeps in external data (``None``: none given)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [next((e.value for e in t.external_data if e.key == "location"), None)
            for t in _get_all_tensors(model) if uses_external_data(t)]


def _check_companion(path: Path) -> None:
    """The weights file ``<name>.data`` beside an ONNX output is a regular file or absent."""
    companion = path.parent / (path.name + ".data")
    if (companion.exists() or companion.is_symlink()) and not companion.is_file():
        raise MixrankError(f"{companion} exists and is not a regular file; the output {path} keeps (or removes) "
                           "its weights there, so write elsewhere or remove it")


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files that the ONNX file at ``path`` keeps its weights in (those that
    exist; none for a self-contained file or one that cannot be read)."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    found = []
    for loc in _data_locations(model):
        if loc and (path.parent / loc).is_file() and path.parent / loc not in found:
            found.append(path.parent / loc)
    return found


def check_onnx_output(out: str | os.PathLike, *inputs: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, an ONNX output that would destroy an input: the output file or
    its companion ``<name>.data`` (written, or removed as stale) may not be any input file nor
    any input's external data. The one exception is ``overwrite`` with the output at an input
    ONNX file itself, whose companion is then replaced too. A companion path that is not a
    regular file is refused as well, so that no stage writes the model and then fails.

    Raises:
        MixrankError: names the two paths.
    """
    from mixrank.core import check_writable_path

    out = Path(out)
    check_writable_path(out)  # a name past the file system's, a folder, a device: one line, first
    if len(os.fsencode(out.name + ".data")) > 255:
        raise MixrankError(f"the ONNX output name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes: its "
                           "weights file <name>.data must fit the file system's 255, so give at most 250")
    companion = out.parent / (out.name + ".data")

    def same(a: Path, b: Path) -> bool:
        return a.exists() and b.exists() and os.path.samefile(a, b)

    given = [Path(i) for i in inputs if i is not None and Path(i).exists()]
    for i in given:
        data = external_data_files(i) if i.suffix == ".onnx" else []
        replaced = overwrite and same(out, i)  # the whole input is replaced, its weights file with it
        for d in data:
            if same(out, d):
                raise MixrankError(f"the output {out} is the external data of {i}; write elsewhere")
            if same(companion, d) and not replaced:
                raise MixrankError(f"the output's weights file {companion} is the external data of {i}; write "
                                   "the output elsewhere")
        if same(companion, i):
            raise MixrankError(f"the output's weights file {companion} is the input {i}; write the output "
                               "elsewhere")
    _check_companion(out)
    return check_writable_path(out, inputs=tuple(inputs), overwrite_input=overwrite)


def model_bytes(model) -> int:
    """Bytes of all initializers (and Constant node values) of an ONNX model."""
    import numpy as np
    from onnx import numpy_helper

    total = 0
    for t in model.graph.initializer:
        total += numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += np.asarray(numpy_helper.to_array(a.t)).nbytes
    return total


def save_onnx(model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save ``model`` at ``path`` atomically (`atomic_write`); weights go to ``<name>.data`` when
    ``external_data`` is true, or when ``None`` and the model is too large for one
    protobuf (over ~1.8 GB). A stale ``<name>.data`` of an earlier save is removed."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    _check_companion(path)

    def write(tmp: Path) -> None:
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data strips the tensors it moves out
            onnx.save_model(copy, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=0)
        else:
            onnx.save_model(model, str(tmp))

    atomic_write(path, write)
    if not external_data:
        (path.parent / data_name).unlink(missing_ok=True)
    return path


def onnx_file_bytes(path: str | os.PathLike) -> int:
    """The ONNX file's bytes plus its external data file, if any."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def check_and_save(model, path: Path, external_data: bool | None = None) -> Path:
    """``onnx.checker`` full check, then an atomic save at ``path`` (`save_onnx`, with
    ``external_data`` as there); a model that fails the check is never left on disk (a
    mixrank bug, so not a MixrankError)."""
    import onnx

    big = model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not big:
        onnx.checker.check_model(model, full_check=True)
    save_onnx(model, path, external_data=external_data if external_data is not None else big)
    if big:  # protobuf cannot hold it in memory: check the saved file by path
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception:
            path.unlink(missing_ok=True)
            (path.parent / (path.name + ".data")).unlink(missing_ok=True)
            raise
    return path
