"""``lowrank``: ``y = (x Bᵀ) Aᵀ`` with A (m, r) and B (r, n), the factors never multiplied
back together. Exported as two MatMuls (or `MatMulNBits`) of inner size r."""

from __future__ import annotations

from ...store import read_back, rebalanced_ste, storage_bytes, store_pair
from ._base import FORMS, LayerForm, linear


@FORMS.register("lowrank")
class LowRank(LayerForm):
    """Both factors stored (``<name>.A``, ``<name>.B``), each block-wise along its
    reduction axis (n for B, r for A) at an integer precision."""

    trainable = ("A", "B")
    plain = True

    def values(self, m, n, r):
        return r * (m + n)

    def per_rank(self, m, n):
        return m + n

    def max_rank(self, m, n, size):
        return (m * n - 1) // (m + n)  # the largest r with r (m + n) < m n

    def stored_bytes(self, space, r):
        return pair_bytes(space.m, space.n, r, space.precision, space.block, space.symmetric)

    def forward(self, x, A, B, index, m, residual=None, linear=linear):
        return linear(linear(x, B, "B"), A, "A")

    def straight_through(self, A, B, precision, quant):
        return rebalanced_ste(A, B, precision, quant)

    def store(self, fit, precision, quant, G=None):
        return store_pair(fit.A, fit.B, precision, quant, G)

    def read(self, tensors, name, info):
        return (read_back(tensors, f"{name}.A", info.rank, info.precision),
                read_back(tensors, f"{name}.B", info.shape[1], info.precision))

    def products(self):
        return (("in", "B"), ("out", "A"))

    def emit_onnx(self, x, info, tensors, layer, ctx):
        import onnx_graphsurgeon as gs

        (m, n), r = info.shape, info.rank
        h = gs.Variable(f"{ctx.base}/xb", dtype=ctx.out_dtype)
        low = gs.Variable(f"{ctx.base}/low_rank", dtype=ctx.out_dtype)
        nodes = ctx.project(x, "B", n, r, f"{ctx.base}/matmul_b", h)
        nodes += ctx.project(h, "A", r, m, f"{ctx.base}/matmul_a", low)
        return nodes, low, r * (m + n)


def pair_bytes(m: int, n: int, r: int, precision: str, block: int = 32, symmetric: bool = False) -> int:
    """Bytes of a factor pair of rank ``r``: B (r, n) blocked over n, A (m, r) over r."""
    return storage_bytes(r, n, precision, block, symmetric) + storage_bytes(m, r, precision, block, symmetric)
