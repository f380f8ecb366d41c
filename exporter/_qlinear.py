"""One stored weight ``W`` (N, K) as an ONNX projection ``y = x Wᵀ``, in the form each
precision and engine runs (docs/design.md, "Precision"):

- fp32: ``MatMul`` with the (K, N) constant (every engine).
- fp16: fp16 constant → ``Cast`` → ``MatMul`` in float32 graphs (every engine).
- int8/int4/int2 for onnxruntime: ``com.microsoft.MatMulNBits`` (codes packed along K,
  float32 scales, packed zero points); or, ``weights="expanded"``, the same bytes behind a
  subgraph of constants (unpack, subtract the zero point, scale) that onnxruntime folds
  into a float32 weight when it loads the model.
- int8/int4 for TensorRT: ``DequantizeLinear`` (signed INT8/INT4, ``block_size``,
  opset 21) → ``MatMul``; symmetric codes only.

The constants hold the stored bytes; nothing multiplies or dequantizes them ahead of
time, so the file's bytes are the quantized bytes. The codes are those of the factors
file, so the engine reads back exactly what the PyTorch simulation computed with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from mixrank.compress import INT_BITS, read_back, stored_qtensor
from mixrank.compress.store import per_channel_int8
from mixrank.core import MixrankError

TARGETS = ("onnxruntime", "tensorrt")
# how onnxruntime holds an integer weight (docs/design.md, "Precision"): "packed", MatMulNBits (the codes stay
# in memory and are dequantized as it runs); "expanded", the codes in the file and a dequantizing subgraph of
# constants that onnxruntime folds into a float32 weight when it loads the model (float32 MatMul speed and
# memory, the file's bytes unchanged)
# "dynamic", the int8 weights requantized per output channel and run as onnxruntime's dynamic int8
# (DynamicQuantizeLinear -> MatMulInteger: each activation tensor quantized to uint8 as the graph runs; int8
# compute, a different result: never chosen by timing alone), the narrower widths expanded
INT_WEIGHTS = ("packed", "expanded", "dynamic")
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
            const: Callable[[str], str], out, target: str = "onnxruntime", weights: str = "packed") -> list:
    """Nodes computing ``out = x @ Wᵀ`` for the weight stored under ``key``.

    Args:
        x: the input gs.Variable (..., K); ``k``, ``n_out``: K and N.
        tensors: the factors file's tensors; ``key``: e.g. ``"blocks.0.mlp.fc1.B"``.
        precision: how it is stored; ``graph_dtype``: numpy dtype of the graph's floats.
        node: the node name (its helpers get suffixes); ``const(what)``: constant names.
        out: the output gs.Variable; ``target``: ``"onnxruntime"`` or ``"tensorrt"``.
        weights: onnxruntime's integer weights, ``"packed"``, ``"expanded"`` or ``"dynamic"``
            (`INT_WEIGHTS`; ``"dynamic"`` runs int8 weights as `_dynamic_matmul` and expands
            the narrower ones).

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
    if weights == "dynamic" and bits == 8:
        return _dynamic_matmul(x, q, k, node, const, role, out)
    if weights in ("expanded", "dynamic"):
        return _expanded_matmul(x, q, codes, scale, zp, bits, k, n_out, node, const, role, out)
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


def _dynamic_matmul(x, q, k, node, const, role, out) -> list:
    """``out = x @ Wᵀ`` as onnxruntime's dynamic int8, the pattern ``quantize_dynamic``
    writes and onnxruntime fuses into ``DynamicQuantizeMatMul``: ``x`` quantized to uint8
    per tensor as the graph runs (``DynamicQuantizeLinear``), ``MatMulInteger`` with the
    weight's per-channel int8 codes (`mixrank.compress.store.per_channel_int8`), the int32
    sums cast to float and
    scaled by the activation's scale times the channel's."""
    import onnx_graphsurgeon as gs

    codes, scale = (t.numpy() for t in per_channel_int8(q))
    n = codes.shape[0]
    xq, xs, xz = (gs.Variable(f"{node}/x_{w}") for w in ("q", "scale", "zp"))
    acc, accf, sc = gs.Variable(f"{node}/int32"), gs.Variable(f"{node}/float"), gs.Variable(f"{node}/scales")
    wq = gs.Constant(const(f"{role}_i8"), np.ascontiguousarray(codes.T))  # (K, N)
    wz = gs.Constant(const(f"{role}_i8_zero_point"), np.zeros(n, np.int8))
    ws = gs.Constant(const(f"{role}_i8_scale"), scale)
    return [gs.Node("DynamicQuantizeLinear", f"{node}_quant", {}, [x], [xq, xs, xz]),
            gs.Node("MatMulInteger", node, {}, [xq, wq, xz, wz], [acc]),
            gs.Node("Cast", f"{node}_cast", {"to": 1}, [acc], [accf]),
            gs.Node("Mul", f"{node}_scales", {}, [xs, ws], [sc]),
            gs.Node("Mul", f"{node}_scale", {}, [accf, sc], [out])]


def _expanded_matmul(x, q, codes, scale, zp, bits, k, n_out, node, const, role, out) -> list:
    """``out = x @ Wᵀ`` with W's stored bytes (codes packed along each block, float32
    scales, packed zero points) as constants and a subgraph that computes ``(code −
    zero_point) · scale`` from them, every input a constant: onnxruntime's constant folding
    turns it into one float32 (K, N) weight at load, bit-exact with `QTensor.dequantize`
    (the same float32 operations in the same order)."""
    import onnx_graphsurgeon as gs

    n, nb, block = codes.shape
    nodes: list = []
    consts: dict = {}
    short = "e" + hashlib.sha1(node.encode()).hexdigest()[:12]  # names short: they are most of these nodes' bytes

    def c_(what: str, value) -> gs.Constant:  # one constant per name
        if what not in consts:
            consts[what] = gs.Constant(f"{short}/{what}" if np.ndim(value) < 2 else const(f"{role}_{what}"),
                                       np.ascontiguousarray(value))
        return consts[what]

    def op(kind: str, what: str, inputs: list, attrs: dict | None = None):
        y = gs.Variable(f"{short}/{what}")  # untyped: no value_info in the file (shape inference fills it)
        nodes.append(gs.Node(kind, "", attrs or {}, inputs, [y]))  # unnamed: onnxruntime folds them away
        return y

    def unpack(packed: np.ndarray, what: str, length: int):
        """The float codes of ``packed`` (..., bytes), low bits first, cut to ``length``."""
        c = op("Cast", f"{what}_f", [c_(what, packed)], {"to": 1})
        per = 8 // bits
        if per == 1:
            return c
        # field i of a byte c is floor(c / 2^(b i)) mod 2^b: all exact in float32, one broadcast over the fields
        u = op("Unsqueeze", f"{what}_u", [c, c_("last", np.array([-1], np.int64))])
        powers = c_("powers", (2.0 ** (bits * np.arange(per))).astype(np.float32))
        f = op("Floor", f"{what}_floor", [op("Div", f"{what}_div", [u, powers])])
        base = c_("base", np.float32(2.0 ** bits))
        high = op("Mul", f"{what}_high", [op("Floor", f"{what}_floor2", [op("Div", f"{what}_div2", [f, base])]), base])
        cat = op("Sub", f"{what}_fields", [f, high])
        shape = np.array([*packed.shape[:-1], packed.shape[-1] * per], np.int64)
        full = op("Reshape", f"{what}_flat", [cat, c_(f"{what}_shape", shape)])
        if shape[-1] == length:
            return full
        return op("Slice", f"{what}_cut", [full, c_("zero", np.array([0], np.int64)),
                                           c_(f"{what}_len", np.array([length], np.int64)),
                                           c_("last", np.array([-1], np.int64))])

    codes_f = unpack(pack_low_first(codes, bits), "q", block)  # (N, blocks, block)
    if q.symmetric:
        z = c_("zp", np.float32(2.0 ** (bits - 1)))
    elif bits == 8:  # (N, blocks, 1)
        z = unpack(zp.reshape(n, nb, 1), "zp", 1)
    else:
        z = op("Unsqueeze", "zp_blocks", [unpack(pack_low_first(zp, bits), "zp", nb),
                                          c_("last", np.array([-1], np.int64))])
    w = op("Mul", "w_blocks", [op("Sub", "centered", [codes_f, z]), c_("scale", scale.reshape(n, nb, 1))])
    w = op("Reshape", "w_rows", [w, c_("rows", np.array([n, nb * block], np.int64))])
    if nb * block != k:
        w = op("Slice", "w_cut", [w, c_("zero", np.array([0], np.int64)), c_("k", np.array([k], np.int64)),
                                  c_("one", np.array([1], np.int64))])
    wt = op("Transpose", "w_t", [w], {"perm": [1, 0]})  # (K, N)
    nodes.append(gs.Node("MatMul", node, {}, [x, wt], [out]))
    return nodes


def _onnx_type(dtype) -> int:
    from onnx import TensorProto

    return {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[np.dtype(dtype).type]
