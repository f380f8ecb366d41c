"""One layer's low-rank-plus-sparse fit: closed form, alternation, compensation.

Every routine here minimises the activation-aware error ``tr(E G Eᵀ)`` with
``E = W − A B − S``, reported relative to ``tr(W G Wᵀ)`` (the layer NMSE;
docs/design.md, "The compression math").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._factor import Spectrum, damped_sqrt, whitened_spectrum
from ._optim import Schedule, descend
from ._sparse import SparseTerm, fit_sparse, fit_values


@dataclass
class LayerFit:
    """A layer's factors and its NMSE.

    Attributes:
        A: (m, r) float32. B: (r, n) float32. sparse: the sparse term or ``None``.
        nmse: ``tr(E G Eᵀ) / tr(W G Wᵀ)`` in the undamped metric; for a layer of a pair
            (`mixrank.compress._pairs`), the pair's relative error.
        history: NMSE after the closed form and after each accepted refinement.
        form: ``"lowrank"``, or for a layer of a pair ``"rows"`` (A is the selection of
            the kept output rows ``index``) or ``"cols"`` (B selects the input columns
            ``index``); the selection is held as a 0/1 matrix and stored as the index.
        index: (r,) int64 kept rows or columns (``rows``/``cols`` only).
        bias: (m,) float32 added to the layer's bias (the new bias of a pair's layer),
            or ``None``.
    """

    A: torch.Tensor
    B: torch.Tensor
    sparse: SparseTerm | None
    nmse: float
    history: list[float] = field(default_factory=list)
    form: str = "lowrank"
    index: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def trainable(self) -> list[str]:
        """The factors a gradient refinement may move (a selection never moves)."""
        return {"lowrank": ["A", "B"], "rows": ["B"], "cols": ["A"]}[self.form]

    def replace(self, **kw) -> LayerFit:
        """A copy with some fields changed (the form, index and bias kept)."""
        from dataclasses import replace

        return replace(self, **kw)

    @property
    def rank(self) -> int:
        return int(self.B.shape[0])

    def dense(self) -> torch.Tensor:
        W = self.A.double() @ self.B.double()
        if self.sparse is not None:
            W = W + self.sparse.dense(self.B.shape[1]).double()
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


def compensate(
    fit: LayerFit,
    W: torch.Tensor,
    G: torch.Tensor,
    ref: float,
    steps: int = 200,
    lr: float = 1e-3,
    damping: float = 1e-2,
) -> LayerFit:
    """Refine ``A``, ``B`` and the sparse values (support fixed) by Adam on the
    layer's output loss, starting from ``fit``; the best iterate is kept and the
    result is never worse than ``fit``.

    The loss is computed in whitened coordinates: with ``L Lᵀ = G + λI``,
    ``tr(E (G+λI) Eᵀ) = ‖W L − A (B L) − S L‖²``; ``B̃ = B L`` is optimised directly,
    which both costs ``O(m n (r + k))`` a step instead of ``O(m n²)`` and makes the
    problem well conditioned for Adam. ``lr`` is relative to each tensor's mean
    magnitude (`descend`).
    """
    if steps <= 0:
        return fit
    dev = G.device
    L, _ = damped_sqrt(G, damping)
    L32 = L.float()
    WL = (W.double().to(dev) @ L).float()  # (m, n)
    A = fit.A.to(dev).clone().requires_grad_(True)
    Bt = (fit.B.double().to(dev) @ L).float().requires_grad_(True)  # (r, n) = B L
    params = [A, Bt]
    sv = idx = None
    if fit.sparse is not None:
        sv = fit.sparse.value.to(dev).clone().requires_grad_(True)
        params.append(sv)
        idx = fit.sparse.index.long().to(dev)
        kind = fit.sparse.kind

    def loss(_step: int) -> torch.Tensor:
        E = WL - A @ Bt
        if sv is not None:
            E = E - kind.times(idx, sv, L32)  # S L
        return (E * E).sum()

    descend(params, loss, None, Schedule(steps=steps, lr=lr))  # full-batch: the loss scores itself
    A1, Bt1 = A.detach(), Bt.detach()
    B1 = torch.linalg.solve_triangular(L.T, Bt1.double().T, upper=True).T \
        if torch.equal(L, torch.tril(L)) else torch.linalg.solve(L.T, Bt1.double().T).T
    S1 = None if fit.sparse is None else SparseTerm(fit.sparse.structure, fit.sparse.index.to(dev),
                                                      sv.detach().float())
    e = nmse(W.to(dev), A1, B1, S1, G, ref)  # everything on G's device
    if e >= fit.nmse:
        return fit
    if S1 is not None:
        S1 = SparseTerm(S1.structure, S1.index.cpu(), S1.value.cpu())
    return LayerFit(A1.float().cpu(), B1.float().cpu(), S1, e, [*fit.history, e])
