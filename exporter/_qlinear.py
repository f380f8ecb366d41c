"""One stored weight ``W`` (N, K) as an ONNX projection ``y = x Wᵀ``, in the form each
precision and engine runs (docs/design.md, "Precision"):

- fp32: ``MatMul`` with the (K, N) constant (every engine).
- fp16: fp16 constant → ``Cast`` → ``MatMul`` in float32 graphs (every engine).
- int8/int4/int2 for onnxruntime: ``com.microsoft.MatMulNBits`` (codes packed along K,
  float32 scales, packed zero points).
- int8/int4 for TensorRT: ``DequantizeLinear`` (signed INT8/INT4, ``block_size``,
  opset 21) → ``MatMul``; symmetric codes only.

The constants hold the stored bytes; nothing multiplies or dequantizes them ahead of
time, so the file's bytes are the quantized bytes. The codes are those of the factors
file, so the engine reads back exactly what the PyTorch simulation computed with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mixrank.compress import INT_BITS, read_back, stored_qtensor
from mixrank.core import MixrankError

TARGETS = ("onnxruntime", "tensorrt")
MS_DOMAIN = "com.microsoft"


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes along the last axis, 8 // bits per byte, the first
    code in the lowest bits (8 bits: as they are); the last byte is padded with zeros."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per = 8 // bits
    pad = -codes.shape[-1] % per
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], -1)
    groups = codes.reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(groups.shape[:-1], np.uint8)
    for i in range(per):
        out |= (groups[..., i] << (i * bits)).astype(np.uint8)
    return out


def project(x, tensors: dict, key: str, k: int, n_out: int, precision: str, graph_dtype, node: str,
            const: Callable[[str], str], out, target: str = "onnxruntime") -> list:
    """Nodes computing ``out = x @ Wᵀ`` for the weight stored under ``key``.

    Args:
        x: the input gs.Variable (..., K); ``k``, ``n_out``: K and N.
        tensors: the factors file's tensors; ``key``: e.g. ``"blocks.0.mlp.fc1.B"``.
        precision: how it is stored; ``graph_dtype``: numpy dtype of the graph's floats.
        node: the node name (its helpers get suffixes); ``const(what)``: constant names.
        out: the output gs.Variable; ``target``: ``"onnxruntime"`` or ``"tensorrt"``.

    Returns:
        The nodes (to append to the graph).
    """
    import onnx_graphsurgeon as gs

    role = key.rsplit(".", 1)[1]
    if precision in ("fp32", "fp16"):
        W = read_back(tensors, key, k, "fp32") if precision == "fp32" else tensors[key].numpy()
        W = W.numpy() if hasattr(W, "numpy") else W
        stored = np.float16 if precision == "fp16" and graph_dtype != np.float16 else graph_dtype
        wt = gs.Constant(const(f"{role}_t"), np.ascontiguousarray(W.T.astype(stored)))  # (K, N)
        if stored == graph_dtype:
            return [gs.Node("MatMul", node, {}, [x, wt], [out])]
        w = gs.Variable(f"{node}/w", dtype=graph_dtype)
        return [gs.Node("Cast", f"{node}_cast", {"to": _onnx_type(graph_dtype)}, [wt], [w]),
                gs.Node("MatMul", node, {}, [x, w], [out])]
    if graph_dtype != np.float32:
        raise MixrankError(f"{key}: integer factors are exported into float32 graphs (their scales are "
                           "float32); export the original in float32")
    q = stored_qtensor(tensors, key, k, precision)
    bits, codes = INT_BITS[precision], q.codes.numpy()
    scale, zp = q.scale.numpy().astype(np.float32), q.zero_point.numpy()
    if target == "tensorrt":
        if bits not in (8, 4):
            raise MixrankError(f"{key}: TensorRT dequantizes INT8 and INT4 weights, not {precision}; store it at "
                               "int4 or int8 for a TensorRT artifact")
        return _dequantize_matmul(x, q, codes, scale, bits, k, n_out, node, const, role, out, graph_dtype)
    inputs = [x, gs.Constant(const(f"{role}_q"), np.ascontiguousarray(pack_low_first(codes, bits))),
              gs.Constant(const(f"{role}_scale"), np.ascontiguousarray(scale.reshape(-1)))]
    if not q.symmetric:  # symmetric codes are offset by 2^(bits-1), MatMulNBits' default zero point
        inputs.append(gs.Constant(const(f"{role}_zp"), np.ascontiguousarray(pack_low_first(zp, bits).reshape(-1))))
    return [gs.Node("MatMulNBits", node, {"K": k, "N": n_out, "bits": bits, "block_size": q.block},
                    inputs, [out], domain=MS_DOMAIN)]


def _dequantize_matmul(x, q, codes, scale, bits, k, n_out, node, const, role, out, graph_dtype) -> list:
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if not q.symmetric:
        raise MixrankError("TensorRT dequantizes symmetric integers only (no zero points): compress with "
                           "scheme='symmetric' for a TensorRT artifact")
    signed = (codes.reshape(codes.shape[0], -1)[:, :k].astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
    wt = np.ascontiguousarray(signed.T)  # (K, N)
    name = const(f"{role}_q")
    if bits == 8:
        wq = gs.Constant(name, wt)
    else:
        packed = pack_low_first((wt.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)[None], 4)[0]
        wq = gs.Constant(name, LazyValues(helper.make_tensor(name, TensorProto.INT4, list(wt.shape),
                                                              packed.tobytes(), raw=True)))
    s = gs.Constant(const(f"{role}_scale"), np.ascontiguousarray(scale.T))  # (blocks, N)
    w = gs.Variable(f"{node}/w", dtype=graph_dtype)
    return [gs.Node("DequantizeLinear", f"{node}_dq", {"axis": 0, "block_size": q.block}, [wq, s], [w]),
            gs.Node("MatMul", node, {}, [x, w], [out])]


def _onnx_type(dtype) -> int:
    from onnx import TensorProto

    return {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[np.dtype(dtype).type]
