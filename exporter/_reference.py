"""The obvious alternatives to compression: the original quantized by onnxruntime's own
quantizers, the way a user would do it. Reports put mixrank beside them.

- ``int8_dynamic``: ``quantize_dynamic`` with int8 weights per output channel, and each
  activation quantized to uint8 as the graph runs (``MatMulInteger`` /
  ``DynamicQuantizeMatMul``): what a CPU user who wants speed runs.
- ``int8``, ``int4``: the weight-only ``MatMulNBitsQuantizer`` (block 32, asymmetric):
  what a user who wants a small file runs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from mixrank.core import MixrankError, import_onnxruntime

from ._onnxio import EXTERNAL_DATA_THRESHOLD, load_onnx, model_bytes, save_onnx

# name -> what it is (the report's words)
REFERENCES = {
    "int8_dynamic": "onnxruntime's quantize_dynamic: int8 weights per output channel, activations quantized to "
                    "uint8 as the graph runs (MatMulInteger)",
    "int8": "onnxruntime's weight-only MatMulNBitsQuantizer, int8, block 32, asymmetric",
    "int4": "onnxruntime's weight-only MatMulNBitsQuantizer, int4, block 32, asymmetric",
}


def write_reference(name: str, onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the reference ``name`` (`REFERENCES`) of ``onnx_path`` to ``out_path``.

    Raises:
        MixrankError: an unknown name, or an input that cannot be read or quantized.
    """
    if name == "int8_dynamic":
        return quantize_dynamic_reference(onnx_path, out_path)
    if name in ("int8", "int4"):
        return quantize_reference(onnx_path, out_path, bits=int(name[3:]), block=32)
    raise MixrankError(f"unknown reference {name!r}; choose from {', '.join(REFERENCES)}")


def check_references(names) -> tuple[str, ...]:
    """``names`` (a comma-separated string or a list) as a tuple of known references, in
    `REFERENCES`' order.

    Raises:
        MixrankError: an unknown name.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in REFERENCES]
    if bad:
        raise MixrankError(f"unknown reference {bad[0]!r}; choose from {', '.join(REFERENCES)}")
    return tuple(n for n in REFERENCES if n in names)


def quantize_reference(onnx_path: str | os.PathLike, out_path: str | os.PathLike, bits: int = 8,
                       block: int = 32) -> Path:
    """Write ``onnx_path`` with every MatMul weight quantized by onnxruntime's
    ``MatMulNBitsQuantizer`` (``bits``, ``block``, asymmetric) to ``out_path``.

    Raises:
        MixrankError: bits other than 2, 4 or 8 (what ``MatMulNBits`` runs), a block that
            is not a power of two of at least 16, or an input that cannot be read.
    """
    if isinstance(bits, bool) or bits not in (2, 4, 8):
        raise MixrankError(f"onnxruntime's MatMulNBits stores 2, 4 or 8 bits, got bits={bits!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise MixrankError(f"the block must be a power of two of at least 16 (MatMulNBits), got {block!r}")
    import_onnxruntime()
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # the quantizer needs the onnx_ir package
        raise MixrankError(f"onnxruntime's weight-only quantizer cannot be imported ({e}); install onnx_ir") from None
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        q = MatMulNBitsQuantizer(load_onnx(onnx_path), bits=bits, block_size=block, is_symmetric=False)
        q.process()
    finally:
        logger.setLevel(level)
    model = q.model.model if hasattr(q.model, "model") else q.model
    return save_onnx(model, out_path)


def quantize_dynamic_reference(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write ``onnx_path`` quantized by onnxruntime's ``quantize_dynamic`` (int8 weights
    per output channel, uint8 activations quantized per tensor as the graph runs) to
    ``out_path``.

    Raises:
        MixrankError: an input that cannot be read or quantized.
    """
    import_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_onnx(onnx_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    try:
        with tempfile.TemporaryDirectory(prefix=".mixrank-q-", dir=Path(out_path).parent) as tmp:
            p = Path(tmp) / "q.onnx"
            try:
                quantize_dynamic(model, p, per_channel=True, weight_type=QuantType.QInt8,
                                 use_external_data_format=model_bytes(model) > EXTERNAL_DATA_THRESHOLD)
            except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises anything
                raise MixrankError(f"onnxruntime's quantize_dynamic failed on {onnx_path}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            return save_onnx(load_onnx(p), out_path)
    finally:
        root.setLevel(level)
