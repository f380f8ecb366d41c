"""Factorization math: activation-aware low-rank in closed form, and plain SVD.

Notation (docs/design.md, "The compression math"): ``W`` is (m, n) = (out, in); ``G = XᵀX`` is (n, n). For an
approximation ``Ŵ`` the activation-aware error is ``tr((W − Ŵ) G (W − Ŵ)ᵀ)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixrank.core import MixrankError

from .. import _linalg as linalg


@dataclass
class Spectrum:
    """Everything needed to build a layer's rank-r factors for any r, from one SVD.

    ``A_r = us[:, :r]`` (m, r) and ``B_r = vt[:r]`` (r, n) give ``W ≈ A_r B_r``;
    ``err[r]`` is the exact activation-aware error ``tr((W−A_rB_r) G (W−A_rB_r)ᵀ)``
    in the undamped metric, ``err_damped[r] = Σ_{i>r} σ_i²`` its value in the
    damped metric (the one the closed form minimises exactly), and ``ref`` is
    ``tr(W G Wᵀ)``, so ``err / ref`` is the layer NMSE.
    """

    us: torch.Tensor  # (m, k) U Σ, float32
    vt: torch.Tensor  # (k, n) V_rᵀ G^{-1/2} (or Vᵀ for plain SVD), float32
    sigma: torch.Tensor  # (k,) float64 singular values of the (weighted) problem
    err: torch.Tensor  # (k + 1,) float64, err[r] for r = 0..k
    err_damped: torch.Tensor  # (k + 1,) float64
    ref: float

    @property
    def max_rank(self) -> int:
        """The largest rank the spectrum has."""
        return int(self.sigma.numel())

    def nmse(self, r: int) -> float:
        """The layer NMSE at rank ``r`` (``err[r] / ref``, r capped at `max_rank`)."""
        return float(self.err[min(r, self.max_rank)] / max(self.ref, 1e-300))

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (m, r), B (r, n)), float32, contiguous."""
        return self.us[:, :r].contiguous(), self.vt[:r].contiguous()


def activation_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """``tr((W − Ŵ) G (W − Ŵ)ᵀ)`` in float64, with ``Ŵ = W_hat``."""
    E = (W.double() - W_hat.double())
    return float(torch.einsum("ij,jk,ik->", E, G.double(), E))


def _tail_sums(x: torch.Tensor) -> torch.Tensor:
    """``out[r] = Σ_{i>=r} x_i`` for r = 0..len(x), ``out[len] = 0``."""
    rev = torch.flip(torch.cumsum(torch.flip(x, [0]), 0), [0])
    return torch.cat([rev, rev.new_zeros(1)])


def damped_sqrt(G: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """A square-root factor ``L`` with ``L Lᵀ = G + λI`` (lower Cholesky; falls back to
    the symmetric root from a clamped eigendecomposition), and ``λ``."""
    G = G.double()
    n = G.shape[0]
    lam = damping * float(torch.diagonal(G).mean())
    if lam <= 0:
        lam = 1e-12 * max(float(torch.diagonal(G).abs().max()), 1.0)
    Gd = G + lam * torch.eye(n, dtype=G.dtype, device=G.device)
    L, info = linalg.cholesky_ex(Gd)
    if int(info) == 0:
        return L, lam
    evals, Q = linalg.eigh(Gd)
    evals = evals.clamp_min(lam)
    return (Q * evals.sqrt()) @ Q.T, lam


def whitened_spectrum(W: torch.Tensor, G: torch.Tensor, damping: float = 1e-2) -> Spectrum:
    """Activation-aware low-rank factorization of ``W`` (m, n) under ``G`` (n, n).

    With ``L Lᵀ = G + λI``, the SVD ``W L = U Σ Vᵀ`` gives ``A = U_r Σ_r``,
    ``B = V_rᵀ L⁻¹``: the best rank-r approximation in the damped metric, whose error
    is exactly ``Σ_{i>r} σ_i²``. The undamped error follows from the same SVD:
    ``err_r = Σ_{i>r} σ_i² (1 − λ‖L⁻ᵀ v_i‖²)``. ``damping``: ``λ = damping · mean(diag G)``.

    Raises:
        MixrankError: ``W`` holds NaN or Inf values.
    """
    if not torch.isfinite(W).all():
        raise MixrankError("the weight holds NaN or Inf values")
    Wd = W.detach().double().to(G.device)
    L, lam = damped_sqrt(G, damping)
    U, S, Vh = linalg.svd(Wd @ L, full_matrices=False)  # (m,k) (k,) (k,n)
    # B = Vhᵀ-rows times L⁻¹:  B L = Vh  ⇔  Lᵀ Bᵀ = Vhᵀ
    B = linalg.solve_triangular(L.T, Vh.T, upper=True).T if _is_lower(L) else (
        linalg.solve(L.T, Vh.T).T
    )
    c = (B * B).sum(dim=1)  # ‖v_iᵀ L⁻¹‖², (k,)
    s2 = S * S
    err_d = _tail_sums(s2)
    err = _tail_sums(s2 * (1.0 - lam * c)).clamp_min(0.0)
    ref = float(torch.einsum("ij,jk,ik->", Wd, G.double(), Wd))
    return Spectrum((U * S).float(), B.float(), S, err, err_d, ref)


def _is_lower(L: torch.Tensor) -> bool:
    return bool(torch.equal(L, torch.tril(L)))


def plain_spectrum(W: torch.Tensor, G: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> Spectrum:
    """Truncated SVD of ``W diag(scale)`` (Eckart–Young), mapped back:
    ``A = U_r Σ_r``, ``B = V_rᵀ diag(scale)⁻¹``. With ``scale=None`` this is the plain
    weight-only SVD. Errors are reported in the activation-aware metric when ``G`` is
    given (so methods compare in one metric), else in the Frobenius norm.
    """
    Wd = W.detach().double()
    s = None if scale is None else scale.double().to(Wd.device).clamp_min(1e-12)
    U, S, Vh = linalg.svd(Wd if s is None else Wd * s, full_matrices=False)
    vt = Vh if s is None else Vh / s  # (k, n) rows v_iᵀ diag(s)⁻¹
    if G is None:
        e = _tail_sums(S * S * (vt * vt).sum(1))
        return Spectrum((U * S).float(), vt.float(), S, e, e, float((Wd * Wd).sum()))
    Gd = G.double().to(Wd.device)
    # E_r = Σ_{i>r} u_i σ_i vt_i, u orthonormal ⇒ tr(E G Eᵀ) = Σ_{i>r} σ_i² vt_i G vt_iᵀ
    vgv = torch.einsum("ij,jk,ik->i", vt, Gd, vt)
    err = _tail_sums(S * S * vgv)
    ref = float(torch.einsum("ij,jk,ik->", Wd, Gd, Wd))
    return Spectrum((U * S).float(), vt.float(), S, err, err, ref)


def ridge_toward(M0: torch.Tensor, P: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """``argmin_M tr(M G Mᵀ) − 2 tr(M Pᵀ) + λ‖M − M0‖²``: the least-squares fit whose
    normal equations are ``M G = P``, damped toward ``M0`` instead of toward zero
    (``M0 + (P − M0 G)(G + λI)⁻¹``; λ = damping · mean diag G, at least 1e-12)."""
    lam = damping * float(torch.diagonal(G).mean())
    lam = lam if lam > 0 else 1e-12
    Gd = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return M0 + linalg.solve(Gd, (P - M0 @ G).T).T
