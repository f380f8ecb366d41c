"""``channel`` sparse: whole input columns ``C`` (k of them).

``S x = S_C x_C``; for a fixed support the values minimising ``tr((R − S) G (R − S)ᵀ)``
are ``S_C = R G[:, C] G[C, C]⁻¹``. It captures the few outlier input channels ViT
activations are known for. At run time: Gather on the last axis + MatMul.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ... import _linalg as linalg
from ._base import SPARSE, SparseStructure, damped


@SPARSE.register("channel")
class ChannelSparse(SparseStructure):
    """``index`` (k,) input columns, ``value`` (m, k)."""

    def index_count(self, k: int, m: int) -> int:
        return k

    def support(self, R: torch.Tensor, G: torch.Tensor, k: int) -> torch.Tensor:
        d = torch.diagonal(G).clamp_min(0)
        score = (R * R).sum(0) * d  # activation-weighted column energy, (n,)
        return torch.topk(score, k).indices.sort().values

    def fit_values(self, index, R, G, lam):
        rhs = R @ G[:, index]  # (m, k)
        return linalg.solve(damped(G[index][:, index], lam), rhs.T).T

    def dense(self, index, value, n):
        S = value.new_zeros(value.shape[0], n)
        S[:, index] = value
        return S

    def apply(self, x, index, value):
        return F.linear(x[..., index], value)  # (..., k) -> (..., m)

    def times(self, index, value, M):
        return value @ M[index]  # (m, k) (k, p)

    def emit_onnx(self, x, index, value, dtype, base, const_name, out_dtype):
        import onnx_graphsurgeon as gs

        gi = gs.Constant(const_name("sparse_index"), np.ascontiguousarray(index.astype(np.int32)))
        g = gs.Variable(f"{base}/sparse_gather", dtype=out_dtype)
        sp = gs.Variable(f"{base}/sparse", dtype=out_dtype)
        sv = gs.Constant(const_name("sparse_value_t"), np.ascontiguousarray(value.T.astype(dtype)))  # (k, m)
        nodes = [gs.Node("Gather", f"{base}/sparse_gather", {"axis": -1}, [x, gi], [g]),
                 gs.Node("MatMul", f"{base}/sparse_matmul", {}, [g, sv], [sp])]  # (..., k) @ (k, m)
        return nodes, sp, sv.values.size
