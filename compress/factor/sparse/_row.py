"""``row`` sparse: k entries per output row (row-balanced).

Entries are chosen by activation-weighted magnitude ``|R_ij|·sqrt(G_jj)``; per row the
values are ``s_i = G[J_i, J_i]⁻¹ (R G)[i, J_i]``. At run time: Gather, Mul, ReduceSum.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import _linalg as linalg
from ._base import SPARSE, SparseStructure, damped


@SPARSE.register("row")
class RowSparse(SparseStructure):
    """``index`` (m, k) input columns per output row, ``value`` (m, k)."""

    def index_count(self, k: int, m: int) -> int:
        return m * k

    def support(self, R: torch.Tensor, G: torch.Tensor, k: int) -> torch.Tensor:
        d = torch.diagonal(G).clamp_min(0)
        score = R.abs() * d.sqrt()  # (m, n)
        return torch.topk(score, k, dim=1).indices.sort(dim=1).values

    def fit_values(self, index, R, G, lam):
        RG = R @ G  # (m, n)
        rhs = torch.gather(RG, 1, index)  # (m, k)
        Gjj = G[index.unsqueeze(-1), index.unsqueeze(-2)]  # (m, k, k)
        return linalg.solve(damped(Gjj, lam), rhs.unsqueeze(-1)).squeeze(-1)

    def dense(self, index, value, n):
        return value.new_zeros(value.shape[0], n).scatter_(1, index, value)

    def apply(self, x, index, value):
        return (x[..., index] * value).sum(-1)  # (..., m, k) -> (..., m)

    def times(self, index, value, M):
        return torch.einsum("mk,mkn->mn", value, M[index])  # Σ_j s_ij M[J_ij, :]

    def emit_onnx(self, x, index, value, dtype, base, const_name, out_dtype):
        import onnx_graphsurgeon as gs

        gi = gs.Constant(const_name("sparse_index"), np.ascontiguousarray(index.astype(np.int32)))
        g = gs.Variable(f"{base}/sparse_gather", dtype=out_dtype)  # (..., m, k)
        sv = gs.Constant(const_name("sparse_value"), np.ascontiguousarray(value.astype(dtype)))
        prod = gs.Variable(f"{base}/sparse_mul", dtype=out_dtype)
        sp = gs.Variable(f"{base}/sparse", dtype=out_dtype)
        axes = gs.Constant(f"{base}/sparse_axes", np.array([-1], dtype=np.int64))
        nodes = [gs.Node("Gather", f"{base}/sparse_gather", {"axis": -1}, [x, gi], [g]),
                 gs.Node("Mul", f"{base}/sparse_mul", {}, [g, sv], [prod]),
                 gs.Node("ReduceSum", f"{base}/sparse_reduce", {"keepdims": 0}, [prod, axes], [sp])]
        return nodes, sp, sv.values.size
