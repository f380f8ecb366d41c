"""End-to-end scoring: the compressed model's output error against the original on the
held-out calibration batches (`output_loss`), for any allocation of ranks, precisions and
forms (`Evaluator`) and for explicit fits (`Evaluator.score_fits`)."""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixrank.core import MixrankError

from ..calibrate import batch_size, block_sequence, limit_samples, model_output, move_batch, run_model
from ..calibrate import distributed as _dist
from ..factor import Spectrum, closed_form_fit, form_of
from ..store import store_pair, store_weight
from ._loss import output_error


def _finite(batch) -> bool:
    """Every floating-point tensor of a batch is finite."""
    if isinstance(batch, torch.Tensor):
        return not batch.is_floating_point() or bool(torch.isfinite(batch).all())
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return all(_finite(v) for v in values)


class _SwitchLinear(nn.Module):
    """A Linear whose rank and storage precision can be switched without rebuilding:
    ``rank=None`` is the dense weight, otherwise the first ``rank`` columns/rows of the
    cached factors; at a precision other than fp32 the factors (or the dense weight) are
    stored and read back exactly as the factors file will hold them (`store_pair`)."""

    CACHE = 8  # stored variants kept per layer (a search revisits a few ranks)

    def __init__(self, lin: nn.Linear, spec: Spectrum, cap: int, gram=None, quant=None, paired=None):
        super().__init__()
        self.paired = paired  # the layer's `PairedSpectrum` when it belongs to a pair
        self.form = "lowrank"
        dev, dt = lin.weight.device, lin.weight.dtype
        self.weight = lin.weight
        self.bias = lin.bias
        self.us = spec.us[:, :cap].to(dev, dt)
        self.vt = spec.vt[:cap].to(dev, dt)
        self.rank: int | None = None
        self.precision = "fp32"
        self.gram, self.quant = gram, quant  # a tensor, or a callable reading it when needed
        self.stored: dict[tuple, tuple] = {}
        self.fit: tuple | None = None  # (A, B, sparse) overriding the rank switch when set

    def _stored(self, r: int | None, p: str) -> tuple:
        """(A, B) or (W,) read back at precision ``p`` — (A, B, bias delta) for a pair's
        form — (cached, oldest dropped first)."""
        key = (r, p, self.form if r is not None else "lowrank")
        if key not in self.stored:
            dev, dt = self.weight.device, self.weight.dtype
            if r is not None and self.form != "lowrank":  # a pair's form: the closed form of its spectrum
                fit = closed_form_fit(self.paired, r)
                if p == "fp32":
                    A, B = fit.A, fit.B
                else:
                    _, A, B = form_of(self.form).store(fit, p, self.quant, self._gram())
                val = _form_state(fit.replace(A=A, B=B), dev, dt)
            elif r is None:
                val = (store_weight(self.weight.detach(), p, self.quant, self._gram())[1].to(dev, dt),)
            else:
                _, A, B = store_pair(self.us[:, :r], self.vt[:r], p, self.quant, self._gram())
                val = (A.to(dev, dt), B.to(dev, dt))
            if len(self.stored) >= self.CACHE:
                self.stored.pop(next(iter(self.stored)))
            self.stored[key] = val
        return self.stored[key]

    def _gram(self) -> torch.Tensor | None:
        return self.gram() if callable(self.gram) else self.gram

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
        self.fit = (*_form_state(fit, dev, dt), sp)

    def _forms(self, x, state):
        form, A, B, index, delta = state
        y = form_of(form).forward(x, A, B, index, self.weight.shape[0])
        return y if delta is None else y + delta

    def forward(self, x):
        if self.fit is not None:
            if self.fit[0] == "dense":  # a dense weight as stored
                return F.linear(x, self.fit[1], self.bias)
            y = self._forms(x, self.fit[:5])
            if self.fit[5] is not None:
                y = y + self.fit[5].apply(x)
            return y if self.bias is None else y + self.bias
        if self.rank is not None and self.form != "lowrank":  # a pair's form
            y = self._forms(x, self._stored(self.rank, self.precision))
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


def _form_state(fit, dev, dt) -> tuple:
    """(form, A, B, index, bias delta) of a `LayerFit` on ``dev`` in ``dt`` (the selection
    factor of a pair's layer is not needed: ``index`` stands for it)."""
    need = fit.trainable
    return (fit.form, fit.A.to(dev, dt) if "A" in need else None, fit.B.to(dev, dt) if "B" in need else None,
            None if fit.index is None else fit.index.to(dev), None if fit.bias is None else fit.bias.to(dev, dt))


class Evaluator:
    """Scores allocations by the whole model's output error on held-out batches.

    Holds one copy of the model whose selected Linear layers switch rank and precision
    in place (``precisions``: layer → precision, fp32 where absent; ``grams`` and
    ``quant`` say how weights are stored), and the original outputs of the held-out
    batches.
    """

    def __init__(self, model: nn.Module, spectra: dict[str, Spectrum], caps: dict[str, int],
                 batches: list, metric: str, max_samples: int | None = None,
                 grams: dict[str, torch.Tensor] | None = None, quant=None, token_mask: str | None = None,
                 paired: dict | None = None):
        self.model = copy.deepcopy(model).eval()
        self.token_mask = token_mask
        self.device = next(self.model.parameters()).device
        self.batches = [move_batch(b, self.device) for b in limit_samples(batches, max_samples)]
        self.weights = [batch_size(b) for b in self.batches]
        self.local = _dist.shard(self.batches)  # the batches this rank scores (all, on one process)
        self.metric = metric
        self.switches: dict[str, _SwitchLinear] = {}
        for i, b in enumerate(self.batches):
            if not _finite(b):
                raise MixrankError(f"held-out calibration batch {i} holds NaN or Inf values; check the "
                                   "calibration data")
        with torch.no_grad():
            self.refs = {i: model_output(self.model, self.batches[i], token_mask).detach() for i in self.local}
        for i, r in self.refs.items():
            if not torch.isfinite(r).all():
                raise MixrankError(f"the model's output on held-out calibration batch {i} holds NaN or Inf "
                                   "values; check the model's weights and the calibration data")
        self.precisions: dict[str, str] = {}
        self.forms: dict[str, str] = {}  # layer -> form ("lowrank" where absent)
        seq = block_sequence(self.model, list(spectra))  # before the Linears become switches
        for name, spec in spectra.items():
            sw = _SwitchLinear(self.model.get_submodule(name), spec, caps[name],
                               None if grams is None else functools.partial(grams.__getitem__, name), quant,
                               (paired or {}).get(name))
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, sw)
            self.switches[name] = sw
        self.cache: dict[tuple, float] = {}
        self.evals = 0
        self.blocks = None if seq is None else self.model.get_submodule(seq[0])
        self.block_of = {} if seq is None else {n: b for b, group in enumerate(seq[1]) for n in group}
        self.base: dict | None = None  # layer -> (rank, precision) whose block outputs are cached
        self.outputs: list[list] = []  # outputs[j][i]: block j's output on held-out batch i, at the base

    def use(self, spaces: dict) -> None:
        """Score at the precision and form of each layer's `LayerSpace`."""
        self.precisions = {n: sp.precision for n, sp in spaces.items()}
        self.forms = {n: sp.form for n, sp in spaces.items()}

    def _state(self, alloc: dict[str, int | None]) -> dict:
        return {n: (r, self.precisions.get(n, "fp32"), self.forms.get(n, "lowrank")) for n, r in alloc.items()}

    def set_base(self, alloc: dict[str, int | None]) -> None:
        """Cache every block's output on the held-out batches at ``alloc``, so that an
        allocation that differs from it only from block b on re-runs blocks b.. alone
        (the blocks before b replay their cached outputs)."""
        if self.blocks is None:
            return
        self._set(alloc)
        outs = [[None] * len(self.batches) for _ in range(len(self.blocks))]
        current = [0]
        hooks = [blk.register_forward_hook(lambda _m, _a, out, j=j: outs[j].__setitem__(current[0], out))
                 for j, blk in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                for i in self.local:
                    current[0] = i
                    run_model(self.model, self.batches[i])
        finally:
            for h in hooks:
                h.remove()
        self.base, self.outputs = self._state(alloc), outs

    def _first_changed_block(self, alloc: dict[str, int | None]) -> int:
        """The first block whose layers differ from the cached base (0: run everything)."""
        if self.base is None:
            return 0
        state = self._state(alloc)
        changed = [n for n, v in state.items() if self.base.get(n) != v]
        if any(n not in self.block_of for n in changed) or set(self.base) != set(state):
            return 0
        return min((self.block_of[n] for n in changed), default=len(self.blocks) - 1)

    def _set(self, alloc: dict[str, int | None]) -> None:
        for name, r in alloc.items():
            self.switches[name].rank = r
            self.switches[name].precision = self.precisions.get(name, "fp32")
            self.switches[name].form = self.forms.get(name, "lowrank")

    def __call__(self, alloc: dict[str, int | None]) -> float:
        key = tuple(sorted((n, r, self.precisions.get(n, "fp32"), self.forms.get(n, "lowrank"))
                           for n, r in alloc.items()))
        if key in self.cache:
            return self.cache[key]
        self._set(alloc)
        score = self._score(self._first_changed_block(alloc))
        self.cache[key] = score
        self.evals += 1
        return score

    def score_fits(self, fits: dict) -> float:
        """Score explicit per-layer fits, used as given: a `LayerFit`, or a tensor for a
        dense weight as stored (layers absent from ``fits`` stay dense at full precision)."""
        for name, sw in self.switches.items():
            sw.rank, sw.precision, sw.form = None, "fp32", "lowrank"
            sw.set_fit(fits.get(name))
        try:
            return self._score()
        finally:
            for sw in self.switches.values():
                sw.set_fit(None)

    def _score(self, start: int = 0) -> float:
        """The weighted mean output error over the held-out batches; blocks before
        ``start`` replay their outputs at the cached base."""
        errs = {}
        current = [0]
        saved = []
        if start > 0:
            for j in range(start):
                saved.append(self.blocks[j])
                self.blocks[j] = _Replay(self.outputs[j], current)
        try:
            with torch.no_grad():
                for i in self.local:
                    current[0] = i
                    y = model_output(self.model, self.batches[i], self.token_mask)
                    errs[i] = output_error(y, self.refs[i], self.metric)
        finally:
            for j, blk in enumerate(saved):
                self.blocks[j] = blk
        every = _dist.gather_by_index(errs, len(self.batches))  # in batch order: as one process sums
        return sum(e * w for e, w in zip(every, self.weights, strict=True)) / sum(self.weights)


class _Replay(nn.Module):
    """Stands in for a block whose output on the current batch is known: returns it."""

    def __init__(self, outputs: list, current: list):
        super().__init__()
        self.outputs, self.current = outputs, current

    def forward(self, *args, **kwargs):
        return self.outputs[self.current[0]]
