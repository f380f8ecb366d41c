"""`compress_model`: calibration → factorization → allocation → refinements → `Factors`.

Every step is looked up by name in its registry (`METHODS` names the factorizer, the
allocator and the refinements of a method), so this file does not change when one is
added (docs/design.md, "Architecture").
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mixrank.core import MixrankError, close_matches

from ._config import CompressConfig
from ._limits import Deadline, scored_samples
from ._methods import METHODS
from .allocate import ALLOCATORS, Allocation, LatencyBudget, LayerChoices
from .artifact import (
    FORMAT_VERSION,
    AllocationInfo,
    BudgetInfo,
    CalibrationInfo,
    Factors,
    LayerPlan,
    Plan,
    Realized,
    RefinementInfo,
    SourceInfo,
    SparsePlan,
    Totals,
    realize,
    weight_fingerprint,
)
from .calibrate import (
    Batch,
    Calibration,
    GramView,
    batch_size,
    collect_stats,
    countable_params,
    linear_layers,
    select_layers,
    split_holdout,
)
from .factor import (
    FACTORIZERS,
    PAIRINGS,
    LayerFit,
    Spectrum,
    closed_form_fit,
    find_pairs,
    form_of,
    nmse,
    pair_forms,
    pair_spectra,
)
from .factor.sparse import INDEX_BYTES, sparse_cost
from .refine import RefineContext, RefineResult, run_refinements, split_layer
from .score import Evaluator
from .store import INT_BITS


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        if v.is_floating_point():
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        else:
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def compress_model(
    model: nn.Module,
    calibration: Iterable[Batch],
    config: CompressConfig | None = None,
    *,
    source: dict | None = None,
    progress: bool = True,
    latency: LatencyBudget | None = None,
) -> Factors:
    """Compress the selected Linear layers of ``model`` under ``config``'s budget.

    Args:
        model: any ``nn.Module`` with Linear layers (not modified).
        calibration: batches: tensors, tuples of tensors (positional arguments) or
            dicts (keyword arguments). A part is held out (``config.holdout``) to
            score allocations; the rest feeds the Gram matrices.
        config: `CompressConfig`; ``None`` is the default (mixrank, keep=0.5).
        source: what to record about the model and data in the plan (for example
            ``{"model": "deit_base_patch16_224", "calibration": "imgs/"}``).
        progress: show progress bars.
        latency: a latency budget the allocation meets besides the byte budget
            (`LatencyBudget`, from a table measured on the target engine:
            `mixrank.engines.latency_table`); the plan records its prediction.

    Returns:
        `Factors`: the factor tensors and the plan.

    Raises:
        MixrankError: bad data, bad config for this model, infeasible budget.
    """
    t0 = time.perf_counter()
    job = _Job(model, config or CompressConfig(), progress, latency)  # what shapes alone can refuse, before data
    torch.manual_seed(job.config.seed)
    stat_batches, holdout = split_holdout(list(calibration), job.config.holdout)
    with _on_device(model, job.config.device):
        calib = job.calibrate(stat_batches)
        spectra = job.factor(calib)
        allocation, evaluator = job.allocate(calib, spectra, holdout)
        shipped = job.refine(calib, spectra, allocation, evaluator, stat_batches)
    plan = job.plan(calib, spectra, allocation, evaluator, shipped, holdout, source)
    return Factors(tensors=shipped.tensors, plan=plan, timings={**job.timings, "total_s": time.perf_counter() - t0})


@contextlib.contextmanager
def _on_device(model: nn.Module, device: str | None):
    """``model`` in eval mode on ``device`` (``None``: where it is) for the block; its
    device and mode are restored afterwards."""
    orig_device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model.to(torch.device(device) if device else orig_device)
        yield model
    finally:
        model.to(orig_device)
        model.train(was_training)


class Spectra(NamedTuple):
    """The factorization stage's result: each selected layer's `Spectrum` under the
    method's factorizer, and each paired layer's `PairedSpectrum`."""

    layers: dict[str, Spectrum]
    paired: dict


class Shipped(NamedTuple):
    """The refinement stage's result: the guarded step's `RefineResult`, what ships as
    stored (`Realized`), and the score of the chosen allocation before any refinement."""

    refined: RefineResult
    stored: Realized
    chosen_score: float

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.stored.tensors


class _Job:
    """One compression: what the model and the configuration fix before any data is read
    (the selected layers and their shapes, the budget in its unit, the pairs), and the
    stages that take it from statistics to what ships."""

    def __init__(self, model: nn.Module, config: CompressConfig, progress: bool, latency: LatencyBudget | None = None):
        self.model, self.config, self.progress, self.latency = model, config, progress, latency
        self.method = METHODS[config.method]
        self.factorizer = FACTORIZERS[self.method.factorizer]
        self.precision = config.precision
        self.timings: dict[str, float] = {}
        self.deadline = Deadline(config.max_seconds)
        sel = config.selection
        self.selected = select_layers(model, sel.include, sel.exclude)
        self.linears = linear_layers(model)
        _check_overrides(sel.overrides, self.selected, self.linears)
        if not self.factorizer.closed_form and self.precision not in ("fp32", "fp16"):
            raise MixrankError(f"method {config.method!r} stores a sparse term in floating point; use precision "
                               "fp32 or fp16")
        self.shapes = {n: tuple(self.linears[n].weight.shape) for n in self.selected}
        self.total = sum(m * n for m, n in self.shapes.values())
        self.model_params = sum(p.numel() for p in model.parameters())
        self.budget = config.budget.resolve(self.total, countable_params(model))
        self.pairs = _pairs_of(model, self.selected, sel.overrides, config)
        self.choices = LayerChoices(self.shapes, config)
        self.choices.check_feasible(self.budget, self.precision)
        self.value_bytes = 2 if self.precision == "fp16" else 4  # float values: what a sparse term is stored in
        self.weights = {n: self.linears[n].weight.detach() for n in self.selected}
        if latency is not None:
            _check_latency(latency, self.selected, self.factorizer, config)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t = time.perf_counter()
        yield
        self.timings[f"{stage}_s"] = time.perf_counter() - t

    def calibrate(self, batches: list) -> Calibration:
        """The selected layers' input statistics on the statistics batches.

        Raises:
            MixrankError: a layer received only zero inputs.
        """
        with self._timed("calibrate"):
            calib = collect_stats(self.model, self.selected, batches, self.config.token_mask,
                                  progress=self.progress, max_memory=self.config.max_memory)
        silent = [n for n in self.selected if not float(calib.layers[n].abs_sum.max()) > 0]
        if silent:
            raise MixrankError(
                f"layer(s) {', '.join(silent[:5])} received only zero inputs on the calibration data, so "
                "nothing says which directions matter; check that the calibration data reaches them "
                "(real inputs, the right preprocessing) or exclude them")
        self.grams = GramView(calib, self.selected)  # read on demand: a spilled Gram comes from its file each time
        return calib

    def factor(self, calib: Calibration) -> Spectra:
        """Every layer's spectrum, and the pairs' (whose forms the allocation then offers)."""
        with self._timed("factor"):
            layers = {}
            for name in tqdm(self.selected, desc="factor", unit="layer", disable=not self.progress):
                layers[name] = self.factorizer.spectrum(self.weights[name], calib.layers[name], self.config)
            paired = pair_spectra(self.pairs, self.model, calib.layers, self.config.damping)
            self.choices.pairs = pair_forms(paired)
            self.residuals = self.choices.attach(self.weights, self.grams, layers)
        return Spectra(layers, paired)

    def allocate(self, calib: Calibration, spectra: Spectra, holdout: list) -> tuple[Allocation, Evaluator]:
        """The allocator's choice, and the evaluator that scored it (set to its spaces)."""
        with self._timed("allocate"):
            widest = self.choices("fp32", unit="params")
            caps = {n: max(sp.cap, sp.fixed or 0) for n, sp in widest.items()}
            search = self.config.search
            scored = scored_samples(search.samples, search.work, calib.tokens_per_sample, self.total)
            evaluator = Evaluator(self.model, spectra.layers, caps, holdout, self.config.metric, scored, self.grams,
                                  self.config.quantize, self.config.token_mask, spectra.paired, self.residuals)
            allocation = ALLOCATORS[self.method.allocator].allocate(self.choices, self.budget, self.config,
                                                                    evaluator, self.progress, deadline=self.deadline,
                                                                    latency=self.latency)
            evaluator.use(allocation.spaces)
        return allocation, evaluator

    def refine(self, calib: Calibration, spectra: Spectra, allocation: Allocation, evaluator: Evaluator,
               train: list) -> Shipped:
        """The chosen allocation's fits, through the guarded refinements, as stored."""
        with self._timed("refine"):
            chosen_score = evaluator(allocation.ranks)
            stored = _Storage(self, allocation, evaluator)
            ctx = RefineContext(self.model, self.config, calib, spectra.layers, allocation.spaces, allocation.ranks,
                                self.weights, train, stored.score, evaluator.batches, self.value_bytes, self.progress,
                                self.deadline)
            fits = self._fits(calib, spectra, allocation, ctx)
            exact = self.factorizer.closed_form and self.precision == "fp32" and not _forced(self.config, fits)
            start_score = chosen_score if exact else stored.score(fits)
            start = self.factorizer.fit_name if fits else allocation.family  # e.g. "dense int8 (quantization alone)"
            refined = run_refinements(ctx, fits, start, start_score, self.method.refinements)
            shipped = stored(refined.fits)
            if self.method.refinements or self.precision != "fp32":  # the error of what ships, as stored
                self._measure(shipped.fits, calib, spectra)
        return Shipped(refined, shipped, chosen_score)

    def _fits(self, calib: Calibration, spectra: Spectra, allocation: Allocation, ctx: RefineContext
              ) -> dict[str, LayerFit]:
        """The fits at the allocated ranks: the factorizer's, a pair's layer its own closed
        form; a forced sparse size (an override) holds in every variant, the first included."""
        fits: dict[str, LayerFit] = {}
        spaces = allocation.spaces
        todo = [(n, r) for n, r in allocation.ranks.items() if r is not None]
        for name, r in tqdm(todo, desc=self.factorizer.fit_name, unit="layer",
                            disable=not self.progress or self.factorizer.closed_form):
            sp = spaces[name]
            if sp.kind.paired:
                fits[name] = closed_form_fit(spectra.paired[name], r)
                continue
            if sp.form == "residual":
                fits[name] = self.residuals.get(name, sp.precision, sp.residual_precision, sp.residual_block).fit_at(r)
                continue
            fits[name] = self.factorizer.fit(self.weights[name], calib.layers[name], spectra.layers[name], r,
                                             spaces[name].value_cost(r, self.value_bytes), self.config,
                                             self.value_bytes)
        for n in _forced(self.config, fits):
            fits[n] = split_layer(ctx, n)
        return fits

    def _measure(self, fits: dict[str, LayerFit], calib: Calibration, spectra: Spectra) -> None:
        """Each shipped layer's NMSE as stored (a pair's error needs both layers' statistics:
        its closed form's stays)."""
        for n, f in fits.items():
            if form_of(f.form).paired:
                continue
            st = calib.layers[n]
            dev = st.gram.device
            if f.residual is not None:  # the whole weight the form stands for: A B + Q
                E = self.weights[n].double().to(dev) - f.dense().to(dev)
                f.nmse = float(torch.einsum("ij,jk,ik->", E, st.gram.double(), E)) / max(spectra.layers[n].ref, 1e-300)
                continue
            f.nmse = nmse(self.weights[n].to(dev), f.A.to(dev), f.B.to(dev), f.sparse, st.gram,
                          spectra.layers[n].ref)

    def plan(self, calib: Calibration, spectra: Spectra, allocation: Allocation, evaluator: Evaluator,
             shipped: Shipped, holdout: list, source: dict | None) -> Plan:
        """The plan of what ships (docs/design.md, "The factors file")."""
        config, refined = self.config, shipped.refined
        source = dict(source or {})
        paired = {n: s for n, s in spectra.paired.items() if allocation.spaces[n].kind.paired}
        layers = {name: self._layer_record(name, allocation, shipped.stored.fits.get(name),
                                           paired.get(name, self._spectrum_of(name, allocation, spectra)), calib)
                  for name in self.selected}
        cands = [dict(c) for c in allocation.candidates]
        return Plan(
            format_version=FORMAT_VERSION,
            method=config.method,
            source=SourceInfo.from_dict({
                "model": source.get("model", type(self.model).__name__),
                "checkpoint_sha256": model_fingerprint(self.model),
                **{k: v for k, v in source.items() if k not in ("model", "calibration")}}),
            budget=self._budget_record(),
            calibration=CalibrationInfo(
                source=source.get("calibration", "in-memory batches"), seed=config.seed, batches=calib.batches,
                samples=calib.samples, holdout_batches=len(holdout),
                holdout_samples=sum(batch_size(b) for b in holdout)),
            config=config.to_dict(),
            layers=layers,
            allocation=AllocationInfo(
                metric=config.metric, family=allocation.family, uniform_score=cands[0]["score"],
                chosen_score=shipped.chosen_score,
                refinement=RefinementInfo(variants=refined.variants, chosen=refined.chosen, score=refined.score),
                evaluations=len(cands), stopped=allocation.stopped,
                scored_samples=sum(batch_size(b) for b in evaluator.batches), candidates=cands),
            totals=self._totals(layers),
            limits=self.deadline.record(),
            latency=None if self.latency is None else self.latency.record(allocation.spaces, allocation.ranks),
        )

    def _spectrum_of(self, name: str, allocation: Allocation, spectra: Spectra):
        """What the plan's ``nmse_closed_form`` of a layer comes from: its form's spectrum."""
        sp = allocation.spaces[name]
        if sp.form == "residual":
            return self.residuals.get(name, sp.precision, sp.residual_precision, sp.residual_block)
        return spectra.layers[name]

    def _budget_record(self) -> BudgetInfo:
        b, unit = self.config.budget, self.config.budget.unit
        float_storage = self.precision in ("fp32", "fp16")
        return BudgetInfo(keep=b.keep, params=b.params, bytes=b.bytes, dtype=b.dtype, precision=self.precision,
                          unit=unit, budget=self.budget,
                          budget_params=self.budget if unit == "params" else (
                              self.budget // self.value_bytes if float_storage else None),
                          selected_params=self.total, selected_bytes=4 * self.total)

    def _totals(self, layers: dict[str, LayerPlan]) -> Totals:
        before = sum(i.params_before for i in layers.values())
        after = sum(i.params_after for i in layers.values())
        return Totals(params_before=before, params_after=after,
                      cost_params=sum(i.cost_params for i in layers.values()),
                      cost=sum(i.cost for i in layers.values()), bytes_before=4 * before,
                      bytes_after=sum(i.bytes_after for i in layers.values()),
                      model_params_before=self.model_params, model_params_after=self.model_params - before + after)

    def _layer_record(self, name: str, allocation: Allocation, fit: LayerFit | None, spectrum: Spectrum,
                      calib: Calibration) -> LayerPlan:
        """A selected layer's plan record (``fit``: its factors as stored; ``None``: dense)."""
        lin, space, r = self.linears[name], allocation.spaces[name], allocation.ranks[name]
        m, n = self.shapes[name]
        rank = None if fit is None else fit.rank
        sp = None if fit is None else fit.sparse
        sp_values = 0 if sp is None else sp.values()
        sp_indices = 0 if sp is None else sp.indices()
        sp_cost = 0 if sp is None else sparse_cost(sp.structure, sp.k, m, n, self.value_bytes)
        form = "lowrank" if fit is None else fit.form
        values = m * n if fit is None else form_of(form).values(m, n, rank) + sp_values
        sp_bytes = sp_values * self.value_bytes + sp_indices * INDEX_BYTES
        return LayerPlan(
            shape=[m, n], rank=rank, dense=fit is None, precision=space.precision,
            sparse=SparsePlan(structure="none" if sp is None else sp.structure, k=0 if sp is None else sp.k,
                              values=sp_values, indices=sp_indices, params=sp_cost),
            nmse=0.0 if fit is None else fit.nmse,
            nmse_closed_form=0.0 if r is None else spectrum.nmse(r),
            params_before=m * n,
            params_after=values + (m if fit is not None and fit.bias is not None and lin.bias is None else 0),
            cost_params=values if fit is None else space.params(rank) + sp_cost,
            cost=space.cost(rank) + (0 if sp is None else (sp_cost if space.unit == "params" else sp_bytes)),
            bytes_after=space.stored_bytes(rank) + sp_bytes,
            sha256=weight_fingerprint(lin.weight),
            sha256_fp16=weight_fingerprint(lin.weight.detach().half()),
            bias=lin.bias is not None,
            tokens=calib.layers[name].tokens,
            form=form,
            pair=getattr(spectrum, "pair", "") if form_of(form).paired else "",
            bias_delta=fit is not None and fit.bias is not None,
            block=space.block if space.precision in INT_BITS else 0,
            residual_precision=space.residual_precision if form == "residual" else "",
            residual_block=space.residual_block if form == "residual" else 0,
        )


class _Storage:
    """Fits stored as they ship (`realize`): the factors file's tensors, and the held-out
    score of the model that reads them back (the guarded step's score)."""

    def __init__(self, job: _Job, allocation: Allocation, evaluator: Evaluator):
        self.job, self.evaluator = job, evaluator
        self.precisions = allocation.precisions
        self.stored_as = {n: (p, allocation.spaces[n].residual_precision) for n, p in self.precisions.items()}
        self.dense = {n: p for n, p in self.precisions.items() if allocation.ranks[n] is None and p != "fp32"}
        self.blocks = {n: allocation.spaces[n].block for n in self.dense}

    def __call__(self, fits: dict[str, LayerFit]) -> Realized:
        job = self.job
        return realize(fits, self.dense, self.precisions, job.config.quantize, job.grams, job.weights, self.blocks)

    def score(self, fits: dict[str, LayerFit]) -> float:
        stored = self(fits)
        return self.evaluator.score_fits({**stored.fits, **stored.dense}, self.stored_as)


def _forced(config: CompressConfig, fits: dict) -> list[str]:
    """The factored layers with a ``sparse_k`` override."""
    return [n for n in fits if "sparse_k" in config.selection.overrides.get(n, {})]


def _check_overrides(overrides: dict, selected: list[str], linears: dict) -> None:
    for name, ov in overrides.items():
        if name not in selected:
            where = "is a Linear layer but not selected (add it to include)" if name in linears \
                else f"names no Linear layer{close_matches(name, list(linears))}"
            raise MixrankError(f"override {name!r} {where}")
        m, n = linears[name].weight.shape
        if ov.get("sparse_k", 0) > n:
            raise MixrankError(
                f"override {name!r}: sparse_k={ov['sparse_k']} is larger than the layer's {n} "
                "input channels")


def _pairs_of(model: nn.Module, selected: list[str], overrides: dict, config: CompressConfig) -> list:
    """The pairs of selected layers (none for structure ``lowrank``); a layer with an
    override is left out of pairs.

    Raises:
        MixrankError: structure ``pairs`` on a model in which no rule finds a pair.
    """
    if config.structure == "lowrank":
        return []
    pairs = find_pairs(model, [n for n in selected if n not in overrides])
    if not pairs and config.structure == "pairs":
        raise MixrankError(f"structure='pairs', but no pair of selected layers was found in {type(model).__name__} "
                           f"(rules: {', '.join(PAIRINGS)}); use structure='auto' or 'lowrank'")
    return pairs


def _check_latency(latency: LatencyBudget, selected: list[str], factorizer, config: CompressConfig) -> None:
    """Refuse a latency budget the model of a choice's time cannot predict.

    Raises:
        MixrankError: a method with a sparse term, int8 compute the table was not measured
            for, or a selected layer the table does not hold.
    """
    if not factorizer.closed_form:
        raise MixrankError(f"method {config.method!r} adds a sparse term, whose time the latency table does not "
                           "model; a latency budget takes a method without one (mixrank, whiten, svd, asvd, quantize)")
    if latency.compute != config.quantize.compute:
        raise MixrankError(f"the latency budget predicts {latency.compute} int8 compute, but the configuration "
                           f"scores {config.quantize.compute}")
    missing = [n for n in selected if n not in latency.table.layers]
    if missing:
        raise MixrankError(f"the latency table has no time for {len(missing)} selected layer(s) "
                           f"({', '.join(missing[:3])}): it was measured for another model or selection")


def latency_layers(model: nn.Module, config: CompressConfig, sample, tokens: int | None = None
                   ) -> dict[str, tuple[int, int, int]]:
    """The selected layers' (out, in, tokens per sample): what a latency table is measured
    for (`mixrank.engines.latency_table`). ``sample``: one input (a tensor, a tuple of
    tensors, or a dict) run through the model to count each layer's tokens per sample;
    ``tokens``: the tokens of every layer instead (a text model timed at a sequence length).
    """
    sel = config.selection
    selected = select_layers(model, sel.include, sel.exclude)
    linears = linear_layers(model)
    seen: dict[str, int] = {}
    if tokens is None:
        def count(name: str):
            def hook(mod, inp, out):  # (batch, ..., in): the tokens per sample are the middle dimensions
                x = inp[0]
                seen.setdefault(name, int(x.numel() // x.shape[-1] // x.shape[0]) if x.dim() > 1 else 1)
            return hook

        hooks = [linears[n].register_forward_hook(count(n)) for n in selected]
        try:
            with torch.no_grad():
                if isinstance(sample, dict):
                    model(**sample)
                elif isinstance(sample, (tuple, list)):
                    model(*sample)
                else:
                    model(sample)
        finally:
            for h in hooks:
                h.remove()
    out = {}
    for n in selected:
        m, k = linears[n].weight.shape
        out[n] = (int(m), int(k), int(tokens if tokens is not None else seen.get(n, 1)))
    return out
