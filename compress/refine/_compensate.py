"""Compensation (``compensate``): each layer's factors refined by Adam on its own output
loss, in whitened coordinates, from the closed form; the result is never worse than
the fit it starts from."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import _linalg as linalg
from ..factor import LayerFit, SparseTerm, damped_sqrt, form_of, nmse
from ._guard import REFINEMENTS, Outcome, Refinement
from ._optim import Schedule, descend


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
    B1 = linalg.solve_triangular(L.T, Bt1.double().T, upper=True).T \
        if torch.equal(L, torch.tril(L)) else linalg.solve(L.T, Bt1.double().T).T
    S1 = None if fit.sparse is None else SparseTerm(fit.sparse.structure, fit.sparse.index.to(dev),
                                                      sv.detach().float())
    e = nmse(W.to(dev), A1, B1, S1, G, ref)  # everything on G's device
    if e >= fit.nmse:
        return fit
    if S1 is not None:
        S1 = SparseTerm(S1.structure, S1.index.cpu(), S1.value.cpu())
    return LayerFit(A1.float().cpu(), B1.float().cpu(), S1, e, [*fit.history, e])


@REFINEMENTS.register("compensate")
class Compensate(Refinement):
    """Each layer's factors refined by Adam on its own output loss (`compensate`)."""

    settings = ("refine.compensate_steps", "refine.compensate_lr", "damping")
    switch = "compensate_steps"

    def run(self, ctx, fits, chosen):
        r = ctx.config.refine
        out = {}
        for n in tqdm(list(fits), desc="compensate", unit="layer", disable=not ctx.progress):
            if not form_of(fits[n].form).plain:  # a pair's layer (its error is the pair's), a residual
                out[n] = fits[n]
                continue
            out[n] = compensate(fits[n], ctx.weights[n], ctx.calib.layers[n].gram, ctx.spectra[n].ref,
                                r.compensate_steps, r.compensate_lr, ctx.config.damping)
        return Outcome(chosen + "+compensate", out)
