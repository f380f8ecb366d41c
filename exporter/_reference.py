"""The obvious alternative to compression: the original's weights quantized by
onnxruntime's own weight-only quantizer, the way a user would do it
(``MatMulNBitsQuantizer``, block-wise, asymmetric). Reports put mixrank beside it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mixrank.core import MixrankError, import_onnxruntime

from ._onnxio import load_onnx, save_onnx


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
