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
from ..store import dynamic_linear, per_channel_int8_of, store_pair, store_weight
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

    def __init__(self, lin: nn.Linear, spec: Spectrum, cap: int, gram=None, quant=None, paired=None,
                 residuals=None, name: str = ""):
        super().__init__()
        self.paired = paired  # the layer's `PairedSpectrum` when it belongs to a pair
        self.residuals, self.name = residuals, name  # the `ResidualBank` of the residual form's fits
        self.form = "lowrank"
        self.block: int | None = None  # a dense layer's integer block (None: quant.block)
        self.residual: tuple = ("", 0)  # the residual form's (precision, block)
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
        """(A, B) or (W,) read back at precision ``p`` — the form's state (form, A, B, index,
        bias delta, residual) for any form but ``lowrank`` — (cached, oldest dropped first)."""
        key = (r, p, self.form, self.residual) if r is not None else (None, p, self.block)
        if key not in self.stored:
            dev, dt = self.weight.device, self.weight.dtype
            if r is not None and self.form != "lowrank":  # the form's own closed form at rank r
                fit = self._form_fit(r, p)
                if p == "fp32":
                    A, B = fit.A, fit.B
                else:
                    _, A, B = form_of(self.form).store(fit, p, self.quant, self._gram())
                val = _form_state(fit.replace(A=A, B=B), dev, dt)
            elif r is None:
                W = store_weight(self.weight.detach(), p, self.quant, self._gram(), block=self.block)[1]
                val = (W.to(dev, dt),)
            else:
                _, A, B = store_pair(self.us[:, :r], self.vt[:r], p, self.quant, self._gram())
                val = (A.to(dev, dt), B.to(dev, dt))
            if len(self.stored) >= self.CACHE:
                self.stored.pop(next(iter(self.stored)))
            self.stored[key] = val
        return self.stored[key]

    def _gram(self) -> torch.Tensor | None:
        return self.gram() if callable(self.gram) else self.gram

    def _form_fit(self, r: int, p: str):
        if self.form == "residual":
            return self.residuals.get(self.name, p, *self.residual).fit_at(r)
        return closed_form_fit(self.paired, r)  # a pair's layer

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

    def _dynamic(self, role: str) -> bool:
        """Whether the stored weight ``role`` of the current choice is scored as dynamic int8."""
        if self.quant is None or getattr(self.quant, "compute", "exact") != "dynamic":
            return False
        return (self.residual[0] if role == "W" and self.form == "residual" else self.precision) == "int8"

    def _linear(self, x, W, role: str = "W"):
        if self._dynamic(role):
            return dynamic_linear(x, *per_channel_int8_of(W))
        return F.linear(x, W)

    def _forms(self, x, state, linear=None):
        form, A, B, index, delta, residual = state
        y = form_of(form).forward(x, A, B, index, self.weight.shape[0], residual,
                                  **({"linear": linear} if linear else {}))
        return y if delta is None else y + delta

    def forward(self, x):
        if self.fit is not None:
            if self.fit[0] == "dense":  # a dense weight as stored
                y = self._linear(x, self.fit[1])
                return y if self.bias is None else y + self.bias
            y = self._forms(x, self.fit[:6], self._linear)
            if self.fit[6] is not None:
                y = y + self.fit[6].apply(x)
            return y if self.bias is None else y + self.bias
        if self.rank is not None and self.form != "lowrank":  # another form
            y = self._forms(x, self._stored(self.rank, self.precision), self._linear)
            return y if self.bias is None else y + self.bias
        if self.rank is None:
            if self.precision == "fp32":
                return F.linear(x, self.weight, self.bias)
            y = self._linear(x, self._stored(None, self.precision)[0])
            return y if self.bias is None else y + self.bias
        if self.precision == "fp32":
            y = F.linear(F.linear(x, self.vt[: self.rank]), self.us[:, : self.rank])
        else:
            A, B = self._stored(self.rank, self.precision)
            y = self._linear(self._linear(x, B, "B"), A, "A")
        return y if self.bias is None else y + self.bias


def _form_state(fit, dev, dt) -> tuple:
    """(form, A, B, index, bias delta, residual) of a `LayerFit` on ``dev`` in ``dt`` (the
    selection factor of a pair's layer is not needed: ``index`` stands for it)."""
    need = fit.trainable
    return (fit.form, fit.A.to(dev, dt) if "A" in need else None, fit.B.to(dev, dt) if "B" in need else None,
            None if fit.index is None else fit.index.to(dev), None if fit.bias is None else fit.bias.to(dev, dt),
            None if fit.residual is None else fit.residual.dequantize().to(dev, dt))


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
                 paired: dict | None = None, residuals=None):
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
        self.storage: dict[str, tuple] = {}  # layer -> (its integer block, its residual storage)
        seq = block_sequence(self.model, list(spectra))  # before the Linears become switches
        for name, spec in spectra.items():
            sw = _SwitchLinear(self.model.get_submodule(name), spec, caps[name],
                               None if grams is None else functools.partial(grams.__getitem__, name), quant,
                               (paired or {}).get(name), residuals, name)
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
        """Score at the precision, form and storage of each layer's `LayerSpace`."""
        self.precisions = {n: sp.precision for n, sp in spaces.items()}
        self.forms = {n: sp.form for n, sp in spaces.items()}
        self.storage = {n: (sp.block, (sp.residual_precision, sp.residual_block)) for n, sp in spaces.items()}

    def _variant(self, n: str) -> tuple:
        return (self.precisions.get(n, "fp32"), self.forms.get(n, "lowrank"), *self.storage.get(n, ()))

    def _state(self, alloc: dict[str, int | None]) -> dict:
        return {n: (r, *self._variant(n)) for n, r in alloc.items()}

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
            sw = self.switches[name]
            sw.rank, sw.precision, sw.form = r, self.precisions.get(name, "fp32"), self.forms.get(name, "lowrank")
            sw.block, sw.residual = self.storage.get(name, (None, ("", 0)))

    def __call__(self, alloc: dict[str, int | None]) -> float:
        key = tuple(sorted((n, r, *self._variant(n)) for n, r in alloc.items()))
        if key in self.cache:
            return self.cache[key]
        self._set(alloc)
        score = self._score(self._first_changed_block(alloc))
        self.cache[key] = score
        self.evals += 1
        return score

    def score_fits(self, fits: dict, precisions: dict[str, tuple[str, str]] | None = None) -> float:
        """Score explicit per-layer fits, used as given: a `LayerFit`, or a tensor for a
        dense weight as stored (layers absent from ``fits`` stay dense at full precision).
        ``precisions``: per layer (precision, the residual term's precision or ``""``) as
        stored, which ``quant.compute="dynamic"`` scores int8 by (``None``: float arithmetic)."""
        for name, sw in self.switches.items():
            p, rp = (precisions or {}).get(name, ("fp32", ""))
            fit = fits.get(name)
            form = getattr(fit, "form", None) or "lowrank"
            sw.rank, sw.precision, sw.form, sw.block, sw.residual = None, p, form, None, (rp, 0)
            sw.set_fit(fit)
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
