"""One layer's low-rank-plus-sparse fit: the closed form and its alternation with the sparse term.

Every routine here minimises the activation-aware error ``tr(E G Eᵀ)`` with
``E = W − A B − S``, reported relative to ``tr(W G Wᵀ)`` (the layer NMSE;
docs/design.md, "The compression math").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..store import QTensor
from ._spectrum import Spectrum, whitened_spectrum
from .forms import form_of
from .sparse import SparseTerm, fit_sparse, fit_values


@dataclass
class LayerFit:
    """A layer's factors and its NMSE.

    Attributes:
        A: (m, r) float32. B: (r, n) float32. sparse: the sparse term or ``None``.
        nmse: ``tr(E G Eᵀ) / tr(W G Wᵀ)`` in the undamped metric; for a layer of a pair
            (`mixrank.compress.factor.pairs`), the pair's relative error.
        history: NMSE after the closed form and after each accepted refinement.
        form: ``"lowrank"``, or for a layer of a pair ``"rows"`` (A is the selection of
            the kept output rows ``index``) or ``"cols"`` (B selects the input columns
            ``index``); the selection is held as a 0/1 matrix and stored as the index.
        index: (r,) int64 kept rows or columns (``rows``/``cols`` only).
        bias: (m,) float32 added to the layer's bias (the new bias of a pair's layer),
            or ``None``.
        residual: the ``residual`` form's dense term ``Q`` (m, n), block-quantized
            (`QTensor`), added to ``A B``; ``None`` for every other form.
        start: the residual form's start that won (``"lowrank"`` or ``"quant"``,
            `fit_residual`); ``""`` otherwise.
    """

    A: torch.Tensor
    B: torch.Tensor
    sparse: SparseTerm | None
    nmse: float
    history: list[float] = field(default_factory=list)
    form: str = "lowrank"
    index: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    residual: QTensor | None = None
    start: str = ""

    @property
    def trainable(self) -> tuple[str, ...]:
        """The factors a gradient refinement may move (a selection never moves)."""
        return form_of(self.form).trainable

    def replace(self, **kw) -> LayerFit:
        """A copy with some fields changed (the form, index and bias kept)."""
        return replace(self, **kw)

    @property
    def rank(self) -> int:
        return int(self.B.shape[0])

    def dense(self) -> torch.Tensor:
        """The (m, n) weight the fit stands for, float64."""
        W = self.A.double() @ self.B.double()
        if self.sparse is not None:
            W = W + self.sparse.dense(self.B.shape[1]).double()
        if self.residual is not None:
            W = W + self.residual.dequantize().double().to(W.device)
        return W


def closed_form_fit(spec: Spectrum, rank: int) -> LayerFit:
    """The rank-``rank`` factors of a spectrum as a `LayerFit` (a pair's layer with its
    form, index and bias delta)."""
    A, B = spec.factors(rank)
    e = spec.nmse(rank)
    form = getattr(spec, "form", "lowrank")
    if form == "lowrank":
        return LayerFit(A, B, None, e, [e])
    return LayerFit(A, B, None, e, [e], form, spec.index[:rank].clone(), spec.bias(rank))


def nmse(W: torch.Tensor, fit_A, fit_B, sparse: SparseTerm | None, G: torch.Tensor,
         ref: float) -> float:
    E = W.double() - fit_A.double() @ fit_B.double()
    if sparse is not None:
        E = E - sparse.dense(W.shape[1]).to(E)
    return float(torch.einsum("ij,jk,ik->", E, G.double(), E)) / max(ref, 1e-300)


def fit_layer(
    W: torch.Tensor,
    G: torch.Tensor,
    rank: int,
    structure: str = "none",
    k: int = 0,
    damping: float = 1e-2,
    alternate: int = 0,
    spectrum: Spectrum | None = None,
) -> LayerFit:
    """Low-rank (rank ``rank``) plus sparse (``structure``, size ``k``) fit of ``W``.

    The low-rank part is the closed form; the sparse part takes the residual with
    a support chosen once and closed-form values. ``alternate`` rounds then refit
    ``AB`` to ``W − S`` and the values to ``W − AB`` (support fixed); a round is
    kept only if it lowers the NMSE, so the NMSE never increases.
    """
    W = W.detach().double().to(G.device)
    spec = spectrum or whitened_spectrum(W, G, damping)
    A, B = spec.factors(rank)
    lam = damping * float(torch.diagonal(G).mean())
    ref = spec.ref
    if structure == "none" or k == 0:
        e = nmse(W, A, B, None, G, ref)
        return LayerFit(A.float(), B.float(), None, e, [e])
    S = fit_sparse(structure, k, W - A.double() @ B.double(), G, lam)
    e = nmse(W, A, B, S, G, ref)
    hist = [e]
    for _ in range(alternate):
        A2, B2 = whitened_spectrum(W - S.dense(W.shape[1]), G, damping).factors(rank)
        R = W - A2.double() @ B2.double()
        S2 = SparseTerm(structure, S.index, fit_values(structure, S.index, R, G, lam))
        e2 = nmse(W, A2, B2, S2, G, ref)
        if e2 >= e:
            break
        A, B, S, e = A2, B2, S2, e2
        hist.append(e)
    S.value = S.value.float()
    return LayerFit(A.float(), B.float(), S, e, hist)
