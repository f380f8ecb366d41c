"""``residual``: a low-rank term plus a block-quantized dense residual,
``y = x Qᵀ + (x Bᵀ) Aᵀ`` (`mixrank.compress.factor._residual`). Stored: ``<name>.A`` and
``<name>.B`` at the layer's precision, ``<name>.W.codes``/``.scale``/``.zero_point`` (Q) at
its ``residual_precision`` and block; exported as ``MatMulNBits(x, Q)`` plus the two
MatMuls of the low-rank branch, which is never merged into ``Q``."""

from __future__ import annotations

from ...store import StoredFactors, qtensor_tensors, read_back, storage_bytes, store_pair
from .._spectrum import ridge_toward, whitened_spectrum
from ._base import FORMS, LayerForm, linear
from ._lowrank import LowRank, pair_bytes


@FORMS.register("residual")
class Residual(LayerForm):
    """Trainable: A and B (``Q`` is fixed once fitted)."""

    trainable = ("A", "B")

    def values(self, m, n, r):
        return m * n + r * (m + n)

    def per_rank(self, m, n):
        return m + n

    def max_rank(self, m, n, size):
        return (m * n - 1) // (m + n)

    def stored_bytes(self, space, r):
        q = storage_bytes(space.m, space.n, space.residual_precision, space.residual_block, space.symmetric)
        return q + pair_bytes(space.m, space.n, r, space.precision, space.block, space.symmetric)

    def forward(self, x, A, B, index, m, residual=None, linear=linear):
        return linear(x, residual, "W") + linear(linear(x, B, "B"), A, "A")

    def straight_through(self, A, B, precision, quant):
        return LowRank.straight_through(self, A, B, precision, quant)

    def store(self, fit, precision, quant, G=None):
        s = store_pair(fit.A, fit.B, precision, quant, G)
        return StoredFactors({**s.tensors, **qtensor_tensors("W", fit.residual)}, s.A, s.B)

    def read(self, tensors, name, info):
        return LowRank.read(self, tensors, name, info)

    def read_residual(self, tensors, name, info):
        return read_back(tensors, f"{name}.W", info.shape[1], info.residual_precision)

    def products(self):
        return (("in", "B"), ("out", "A"), ("dense", "W"))

    def emit_onnx(self, x, info, tensors, layer, ctx):
        import onnx_graphsurgeon as gs

        (m, n), r = info.shape, info.rank
        q = gs.Variable(f"{ctx.base}/xq", dtype=ctx.out_dtype)
        nodes, lr, _ = LowRank.emit_onnx(self, x, info, tensors, layer, ctx)
        nodes += ctx.project(x, "W", n, m, f"{ctx.base}/matmul_q", q, precision=info.residual_precision)
        low = gs.Variable(f"{ctx.base}/residual_sum", dtype=ctx.out_dtype)
        nodes.append(gs.Node("Add", f"{ctx.base}/add_residual", {}, [q, lr], [low]))
        return nodes, low, m * n + r * (m + n)

    def refit(self, fit, lin, stats, damping):
        """The low-rank term refit to the original outputs from the compressed path's
        inputs, ``Q`` kept: ``A B`` the closed form of ``W̃ − Q`` under ``G_cc``."""
        cc = stats["cc"]
        W = lin.weight.detach().double().to(cc.device)
        target = ridge_toward(W, W @ stats["oc"], cc, damping) - fit.residual.dequantize().double().to(cc.device)
        A, B = whitened_spectrum(target, cc, damping).factors(fit.rank)
        return fit.replace(A=A.float().cpu(), B=B.float().cpu())
