"""End-to-end scoring: the compressed model's output error against the original on the
held-out calibration batches. Allocations, refinements and distillation are all judged
by `output_loss` (docs/design.md, "Scoring")."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._batches import first_tensor, limit_samples, move_batch, run_model
from ._factor import Spectrum


def output_loss(y: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """Mean error of ``y`` against ``ref`` (differentiable, float64): logits KL(ref‖y),
    normalised MSE, or 1 − cosine; ``"auto"`` is normalised MSE. In float64 because a
    well-compressed model's KL (1e-6 and below) is under float32's rounding noise of
    ``Σ p (log p − log q)``."""
    y, ref = y.double(), ref.double()
    if metric == "auto":
        metric = "mse"
    if metric == "kl":
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(y, -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    if metric == "mse":
        return ((y - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-300)
    return 1.0 - F.cosine_similarity(y.flatten(1), ref.flatten(1), dim=-1).mean()


def output_error(y: torch.Tensor, ref: torch.Tensor, metric: str) -> float:
    """`output_loss` as a float."""
    with torch.no_grad():
        return float(output_loss(y, ref, metric))


class _SwitchLinear(nn.Module):
    """A Linear whose rank can be switched without rebuilding: ``rank=None`` is the
    dense weight, otherwise the first ``rank`` columns/rows of the cached factors."""

    def __init__(self, lin: nn.Linear, spec: Spectrum, cap: int):
        super().__init__()
        dev, dt = lin.weight.device, lin.weight.dtype
        self.weight = lin.weight
        self.bias = lin.bias
        self.us = spec.us[:, :cap].to(dev, dt)
        self.vt = spec.vt[:cap].to(dev, dt)
        self.rank: int | None = None
        self.fit: tuple | None = None  # (A, B, sparse) overriding the rank switch when set

    def set_fit(self, fit) -> None:
        """Use a `LayerFit`'s factors (``None`` returns to the rank switch)."""
        if fit is None:
            self.fit = None
            return
        dev, dt = self.weight.device, self.weight.dtype
        sp = fit.sparse
        if sp is not None:
            sp = type(sp)(sp.structure, sp.index.to(dev), sp.value.to(dev, dt))
        self.fit = (fit.A.to(dev, dt), fit.B.to(dev, dt), sp)

    def forward(self, x):
        if self.fit is not None:
            A, B, sp = self.fit
            y = F.linear(F.linear(x, B), A)
            if sp is not None:
                y = y + sp.apply(x)
            return y if self.bias is None else y + self.bias
        if self.rank is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(F.linear(x, self.vt[: self.rank]), self.us[:, : self.rank])
        return y if self.bias is None else y + self.bias


class Evaluator:
    """Scores allocations by the whole model's output error on held-out batches.

    Holds one copy of the model whose selected Linear layers switch rank in place,
    and the original outputs of the held-out batches.
    """

    def __init__(self, model: nn.Module, spectra: dict[str, Spectrum], caps: dict[str, int],
                 batches: list, metric: str, max_samples: int | None = None):
        self.model = copy.deepcopy(model).eval()
        self.device = next(self.model.parameters()).device
        self.batches = [move_batch(b, self.device) for b in limit_samples(batches, max_samples)]
        self.metric = metric
        self.switches: dict[str, _SwitchLinear] = {}
        with torch.no_grad():
            self.refs = [first_tensor(run_model(self.model, b)).detach() for b in self.batches]
        for name, spec in spectra.items():
            sw = _SwitchLinear(self.model.get_submodule(name), spec, caps[name])
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, sw)
            self.switches[name] = sw
        self.cache: dict[tuple, float] = {}
        self.evals = 0

    def __call__(self, alloc: dict[str, int | None]) -> float:
        key = tuple(sorted(alloc.items(), key=lambda kv: kv[0]))
        if key in self.cache:
            return self.cache[key]
        for name, r in alloc.items():
            self.switches[name].rank = r
        score = self._score()
        self.cache[key] = score
        self.evals += 1
        return score

    def score_fits(self, fits: dict) -> float:
        """Score explicit per-layer fits (layers absent from ``fits`` stay dense)."""
        for name, sw in self.switches.items():
            sw.rank = None
            sw.set_fit(fits.get(name))
        try:
            return self._score()
        finally:
            for sw in self.switches.values():
                sw.set_fit(None)

    def _score(self) -> float:
        errs, weights = [], []
        with torch.no_grad():
            for b, ref in zip(self.batches, self.refs, strict=True):
                y = first_tensor(run_model(self.model, b))
                errs.append(output_error(y, ref, self.metric))
                weights.append(ref.shape[0] if ref.ndim else 1)
        return sum(e * w for e, w in zip(errs, weights, strict=True)) / sum(weights)
