"""End-to-end scoring: the compressed model's output error against the original on the
held-out calibration batches. Allocations, refinements and distillation are all judged
by `output_loss` (docs/design.md, "Scoring")."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._batches import first_tensor, limit_samples, move_batch, run_model
from ._errors import MixrankError
from ._factor import Spectrum
from ._storage import store_pair, store_weight


def _finite(batch) -> bool:
    """Every floating-point tensor of a batch is finite."""
    if isinstance(batch, torch.Tensor):
        return not batch.is_floating_point() or bool(torch.isfinite(batch).all())
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return all(_finite(v) for v in values)


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
    """A Linear whose rank and storage precision can be switched without rebuilding:
    ``rank=None`` is the dense weight, otherwise the first ``rank`` columns/rows of the
    cached factors; at a precision other than fp32 the factors (or the dense weight) are
    stored and read back exactly as the factors file will hold them (`store_pair`)."""

    CACHE = 8  # stored variants kept per layer (a search revisits a few ranks)

    def __init__(self, lin: nn.Linear, spec: Spectrum, cap: int, gram: torch.Tensor | None = None,
                 quant=None):
        super().__init__()
        dev, dt = lin.weight.device, lin.weight.dtype
        self.weight = lin.weight
        self.bias = lin.bias
        self.us = spec.us[:, :cap].to(dev, dt)
        self.vt = spec.vt[:cap].to(dev, dt)
        self.rank: int | None = None
        self.precision = "fp32"
        self.gram, self.quant = gram, quant
        self.stored: dict[tuple, tuple] = {}
        self.fit: tuple | None = None  # (A, B, sparse) overriding the rank switch when set

    def _stored(self, r: int | None, p: str) -> tuple:
        """(A, B) or (W,) read back at precision ``p`` (cached, oldest dropped first)."""
        key = (r, p)
        if key not in self.stored:
            dev, dt = self.weight.device, self.weight.dtype
            if r is None:
                val = (store_weight(self.weight.detach(), p, self.quant, self.gram)[1].to(dev, dt),)
            else:
                _, A, B = store_pair(self.us[:, :r], self.vt[:r], p, self.quant, self.gram)
                val = (A.to(dev, dt), B.to(dev, dt))
            if len(self.stored) >= self.CACHE:
                self.stored.pop(next(iter(self.stored)))
            self.stored[key] = val
        return self.stored[key]

    def set_fit(self, fit) -> None:
        """Use a `LayerFit`'s factors, or a dense weight given as a tensor (``None``
        returns to the rank switch)."""
        if fit is None:
            self.fit = None
            return
        dev, dt = self.weight.device, self.weight.dtype
        if isinstance(fit, torch.Tensor):
            self.fit = ("dense", fit.to(dev, dt))
            return
        sp = fit.sparse
        if sp is not None:
            sp = type(sp)(sp.structure, sp.index.to(dev), sp.value.to(dev, dt))
        self.fit = (fit.A.to(dev, dt), fit.B.to(dev, dt), sp)

    def forward(self, x):
        if self.fit is not None:
            if self.fit[0] == "dense":  # a dense weight as stored
                return F.linear(x, self.fit[1], self.bias)
            A, B, sp = self.fit
            y = F.linear(F.linear(x, B), A)
            if sp is not None:
                y = y + sp.apply(x)
            return y if self.bias is None else y + self.bias
        if self.rank is None:
            W = self.weight if self.precision == "fp32" else self._stored(None, self.precision)[0]
            return F.linear(x, W, self.bias)
        if self.precision == "fp32":
            y = F.linear(F.linear(x, self.vt[: self.rank]), self.us[:, : self.rank])
        else:
            A, B = self._stored(self.rank, self.precision)
            y = F.linear(F.linear(x, B), A)
        return y if self.bias is None else y + self.bias


class Evaluator:
    """Scores allocations by the whole model's output error on held-out batches.

    Holds one copy of the model whose selected Linear layers switch rank and precision
    in place (``precisions``: layer → precision, fp32 where absent; ``grams`` and
    ``quant`` say how weights are stored), and the original outputs of the held-out
    batches.
    """

    def __init__(self, model: nn.Module, spectra: dict[str, Spectrum], caps: dict[str, int],
                 batches: list, metric: str, max_samples: int | None = None,
                 grams: dict[str, torch.Tensor] | None = None, quant=None):
        self.model = copy.deepcopy(model).eval()
        self.device = next(self.model.parameters()).device
        self.batches = [move_batch(b, self.device) for b in limit_samples(batches, max_samples)]
        self.metric = metric
        self.switches: dict[str, _SwitchLinear] = {}
        for i, b in enumerate(self.batches):
            if not _finite(b):
                raise MixrankError(f"held-out calibration batch {i} holds NaN or Inf values; check the "
                                   "calibration data")
        with torch.no_grad():
            self.refs = [first_tensor(run_model(self.model, b)).detach() for b in self.batches]
        for i, r in enumerate(self.refs):
            if not torch.isfinite(r).all():
                raise MixrankError(f"the model's output on held-out calibration batch {i} holds NaN or Inf "
                                   "values; check the model's weights and the calibration data")
        self.precisions: dict[str, str] = {}
        for name, spec in spectra.items():
            sw = _SwitchLinear(self.model.get_submodule(name), spec, caps[name],
                               None if grams is None else grams[name], quant)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, sw)
            self.switches[name] = sw
        self.cache: dict[tuple, float] = {}
        self.evals = 0

    def __call__(self, alloc: dict[str, int | None]) -> float:
        key = tuple(sorted((n, r, self.precisions.get(n, "fp32")) for n, r in alloc.items()))
        if key in self.cache:
            return self.cache[key]
        for name, r in alloc.items():
            self.switches[name].rank = r
            self.switches[name].precision = self.precisions.get(name, "fp32")
        score = self._score()
        self.cache[key] = score
        self.evals += 1
        return score

    def score_fits(self, fits: dict) -> float:
        """Score explicit per-layer fits, used as given: a `LayerFit`, or a tensor for a
        dense weight as stored (layers absent from ``fits`` stay dense at full precision)."""
        for name, sw in self.switches.items():
            sw.rank, sw.precision = None, "fp32"
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
