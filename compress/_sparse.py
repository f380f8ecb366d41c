"""The sparse term: a residual correction ``S`` with a structure an engine can run.

``channel``: whole input columns ``C`` (k of them). ``S x = S_C x_C``; for a fixed
support the values minimising ``tr((R − S) G (R − S)ᵀ)`` are
``S_C = R G[:, C] G[C, C]⁻¹``. At run time: Gather on the last axis + MatMul.

``row``: k entries per output row (row-balanced), chosen by ``|R_ij|·sqrt(G_jj)``,
values per row ``s_i = G[J_i, J_i]⁻¹ (R G)[i, J_i]``. At run time: Gather, Mul,
ReduceSum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._errors import MixrankError

STRUCTURES = ("none", "channel", "row")
INDEX_BYTES = 4  # indices are stored as int32


@dataclass
class SparseTerm:
    """``structure`` ``"channel"``: ``index`` (k,) columns, ``value`` (m, k).
    ``structure`` ``"row"``: ``index`` (m, k) columns per row, ``value`` (m, k)."""

    structure: str
    index: torch.Tensor
    value: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.value.shape[1])

    def values(self) -> int:
        return self.value.numel()

    def indices(self) -> int:
        return self.index.numel()

    def dense(self, n: int) -> torch.Tensor:
        """The (m, n) matrix ``S``."""
        m = self.value.shape[0]
        S = self.value.new_zeros(m, n)
        idx = self.index.long().to(self.value.device)
        if self.structure == "channel":
            S[:, idx] = self.value
        else:
            S.scatter_(1, idx, self.value)
        return S

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x Sᵀ`` for x (..., n) → (..., m), using only the support."""
        idx = self.index.long().to(x.device)
        if self.structure == "channel":
            return torch.nn.functional.linear(x[..., idx], self.value)
        g = x[..., idx]  # (..., m, k)
        return (g * self.value).sum(-1)


def sparse_cost(structure: str, k: int, m: int, n: int, value_bytes: int = 4) -> int:
    """Parameter-equivalent cost of a sparse term: its values plus its int32 index
    storage expressed in values of ``value_bytes``."""
    if structure == "none" or k == 0:
        return 0
    ratio = INDEX_BYTES / value_bytes
    if structure == "channel":
        return m * k + math.ceil(k * ratio)
    if structure == "row":
        return m * k + math.ceil(m * k * ratio)
    raise MixrankError(f"unknown sparse structure {structure!r}; choose one of {', '.join(STRUCTURES)}")


def largest_k(structure: str, budget: int, m: int, n: int, value_bytes: int = 4) -> int:
    """The largest sparse size whose cost fits in ``budget`` (at most ``n``)."""
    if structure == "none" or budget <= 0:
        return 0
    k = min(n, budget // m)
    while k > 0 and sparse_cost(structure, k, m, n, value_bytes) > budget:
        k -= 1
    return k


def _damped(Gs: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(Gs.shape[-1], dtype=Gs.dtype, device=Gs.device)
    return Gs + lam * eye


def fit_values(structure: str, index: torch.Tensor, R: torch.Tensor, G: torch.Tensor,
               lam: float) -> torch.Tensor:
    """Closed-form values for a fixed support (float64)."""
    R, G = R.double(), G.double()
    idx = index.long()
    if structure == "channel":
        rhs = R @ G[:, idx]  # (m, k)
        return torch.linalg.solve(_damped(G[idx][:, idx], lam), rhs.T).T
    RG = R @ G  # (m, n)
    rhs = torch.gather(RG, 1, idx)  # (m, k)
    Gjj = G[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (m, k, k)
    return torch.linalg.solve(_damped(Gjj, lam), rhs.unsqueeze(-1)).squeeze(-1)


def fit_sparse(structure: str, k: int, R: torch.Tensor, G: torch.Tensor,
               lam: float) -> SparseTerm | None:
    """Choose a support of size ``k`` for the residual ``R`` (m, n) and fit its values."""
    if structure == "none" or k == 0:
        return None
    m, n = R.shape
    if k > n:
        raise MixrankError(f"sparse size {k} is larger than the layer's {n} input channels")
    R, G = R.double(), G.double()
    d = torch.diagonal(G).clamp_min(0)
    if structure == "channel":
        score = (R * R).sum(0) * d  # activation-weighted column energy, (n,)
        index = torch.topk(score, k).indices.sort().values
    elif structure == "row":
        score = R.abs() * d.sqrt()  # (m, n)
        index = torch.topk(score, k, dim=1).indices.sort(dim=1).values
    else:
        raise MixrankError(f"unknown sparse structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    value = fit_values(structure, index, R, G, lam)
    return SparseTerm(structure, index.to(torch.int32), value)
