"""Factorizers: how a layer's weight becomes factors, registered by name.

A `Factorizer` gives a layer's `Spectrum` (its whole error-versus-rank curve, which the
allocation uses) and the layer's fit at an allocated rank. The built-in ones:

- ``whiten``: activation-aware closed form, SVD-LLM (Wang et al., "SVD-LLM:
  Truncation-aware Singular Value Decomposition for Large Language Model Compression",
  2024): Cholesky whitening ``G = L Lᵀ``, truncate the SVD of ``W L``, map back with
  ``L⁻¹`` (`whitened_spectrum`). mixrank's own methods start here.
- ``svd``: truncated SVD of the weight (Eckart–Young), no activations.
- ``asvd``: ASVD (Yuan et al., "ASVD: Activation-aware Singular Value Decomposition
  for Compressing Large Language Models", 2023): scale input channels by
  ``S = diag(mean|x_j|)^α`` (α = 0.5), truncate the SVD of ``W S``, map back with ``S⁻¹``.
- ``oats``: OATS (Zhang & Papyan, "OATS: Outlier-Aware Pruning Through Sparse and Low
  Rank Decomposition", 2024): scale columns by ``D = diag(‖X_j‖₂)``, then alternate
  ``L ← SVD_r(W D − S)`` and ``S ← top-k per row of |W D − L|``; ``Ŵ = (L + S) D⁻¹``.

All use the same cost accounting as mixrank: a sparse part pays for its values and its
int32 indices. Adding one: docs/design.md, "Adding a factorizer".
"""

from __future__ import annotations

import torch

from mixrank.core import Registry

from .. import _linalg as linalg
from ..calibrate import LayerStats
from ._fit import LayerFit, closed_form_fit, nmse
from ._spectrum import Spectrum, plain_spectrum, whitened_spectrum
from .sparse import SparseTerm, largest_k

ASVD_ALPHA = 0.5
OATS_RANK_RATIO = 0.3  # fraction of a layer's budget given to the low-rank part
OATS_ITERS = 20


class Factorizer:
    """Interface.

    Attributes:
        settings: the `CompressConfig` settings this factorizer reads (``"damping"``).
        closed_form: its `fit` is the spectrum's own rank-r factors (so the allocation's
            score is the fit's score and need not be measured again).
        fit_name: the name of its fit in the plan's list of variants.
    """

    name: str = ""
    settings: tuple[str, ...] = ()
    closed_form: bool = True
    fit_name: str = "closed_form"

    def spectrum(self, W: torch.Tensor, stats: LayerStats, config) -> Spectrum:
        """The layer's `Spectrum` (every rank's factors and error) from its weight ``W``
        (m, n), its input statistics and the `CompressConfig`."""
        raise NotImplementedError

    def fit(self, W: torch.Tensor, stats: LayerStats, spec: Spectrum, rank: int, cost: int,
            config, value_bytes: int) -> LayerFit:
        """The layer's factors at ``rank`` within ``cost`` parameter equivalents."""
        return closed_form_fit(spec, rank)


FACTORIZERS: Registry[Factorizer] = Registry("factorizer")


@FACTORIZERS.register("whiten")
class Whiten(Factorizer):
    settings = ("damping",)

    def spectrum(self, W, stats, config):
        return whitened_spectrum(W, stats.gram, config.damping)


@FACTORIZERS.register("svd")
class PlainSVD(Factorizer):
    def spectrum(self, W, stats, config):
        return plain_spectrum(W.to(stats.gram.device), stats.gram)


def asvd_spectrum(W: torch.Tensor, G: torch.Tensor, abs_mean: torch.Tensor,
                  alpha: float = ASVD_ALPHA) -> Spectrum:
    """ASVD: SVD of ``W diag(mean|x|^α)``; errors in the activation-aware metric."""
    return plain_spectrum(W.to(G.device), G, abs_mean.double().clamp_min(1e-8) ** alpha)


@FACTORIZERS.register("asvd")
class ASVD(Factorizer):
    def spectrum(self, W, stats, config):
        return asvd_spectrum(W, stats.gram, stats.abs_mean)


def oats_fit(W: torch.Tensor, G: torch.Tensor, tokens: int, cost: int, value_bytes: int = 4,
             rank_ratio: float = OATS_RANK_RATIO, iters: int = OATS_ITERS,
             step: int = 8) -> LayerFit:
    """OATS for one layer within ``cost`` parameter-equivalents."""
    m, n = W.shape
    Wd = W.detach().double().to(G.device)
    d = (torch.diagonal(G.double()) / max(tokens, 1)).clamp_min(1e-12).sqrt()  # (n,)
    Ws = Wd * d
    r = max(step, int(rank_ratio * cost / (m + n)) // step * step)
    r = min(r, cost // (m + n))
    k = largest_k("row", cost - r * (m + n), m, n, value_bytes)
    S = torch.zeros_like(Ws)
    idx = None
    for _ in range(iters):
        U, Sig, Vh = linalg.svd(Ws - S, full_matrices=False)
        Lr = (U[:, :r] * Sig[:r]) @ Vh[:r]
        R = Ws - Lr
        if k == 0:
            break
        idx = torch.topk(R.abs(), k, dim=1).indices.sort(dim=1).values
        S = torch.zeros_like(R).scatter_(1, idx, torch.gather(R, 1, idx))
    U, Sig, Vh = linalg.svd(Ws - S, full_matrices=False)
    A, B = (U[:, :r] * Sig[:r]), Vh[:r] / d
    sparse = None
    if k:
        sparse = SparseTerm("row", idx.to(torch.int32),
                            (torch.gather(S, 1, idx) / d[idx]).float())
    ref = float(torch.einsum("ij,jk,ik->", Wd, G.double(), Wd))
    e = nmse(Wd, A, B, sparse, G, ref)
    return LayerFit(A.float(), B.float(), sparse, e, [e])


@FACTORIZERS.register("oats")
class OATS(Factorizer):
    """Its allocation is scored on the whitened spectrum (the same uniform ranks as the
    other baselines); its fit is its own low rank plus row-sparse split of the cost."""

    settings = ("damping",)
    closed_form = False
    fit_name = "oats"

    def spectrum(self, W, stats, config):
        return whitened_spectrum(W, stats.gram, config.damping)

    def fit(self, W, stats, spec, rank, cost, config, value_bytes):
        return oats_fit(W, stats.gram, stats.tokens, cost, value_bytes, step=config.selection.rank_step)
