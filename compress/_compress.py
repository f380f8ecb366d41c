"""`compress_model`: calibration → factorization → allocation → refinements → `Factors`.

Every step is looked up by name in its registry (`METHODS` names the factorizer, the
allocator and the refinements of a method), so this file does not change when one is
added (docs/design.md, "Architecture").
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._allocate import ALLOCATORS, AUTO_PRECISIONS, alloc_cost, feasible_range, layer_spaces, uniform_allocation
from ._batches import Batch, batch_size, split_holdout
from ._calibrate import Calibration, GramView, collect_stats
from ._config import CompressConfig
from ._errors import MixrankError, close_matches
from ._factor import Spectrum
from ._factorizers import FACTORIZERS
from ._factors import Factors, weight_fingerprint
from ._fit import LayerFit, closed_form_fit, nmse
from ._methods import METHODS
from ._optim import Deadline
from ._pairs import PAIRINGS, find_pairs, pair_spectra
from ._plan import (
    FORMAT_VERSION,
    AllocationInfo,
    BudgetInfo,
    CalibrationInfo,
    LayerPlan,
    Plan,
    RefinementInfo,
    SourceInfo,
    SparsePlan,
    Totals,
)
from ._refine import RefineContext, run_refinements, split_layer
from ._scoring import Evaluator
from ._select import linear_layers, select_layers
from ._sparse import INDEX_BYTES, sparse_cost
from ._storage import realize


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


def compress_model(
    model: nn.Module,
    calibration: Iterable[Batch],
    config: CompressConfig | None = None,
    *,
    source: dict | None = None,
    progress: bool = True,
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

    Returns:
        `Factors`: the factor tensors and the plan.

    Raises:
        MixrankError: bad data, bad config for this model, infeasible budget.
    """
    config = config or CompressConfig()
    method = METHODS[config.method]
    factorizer = FACTORIZERS[method.factorizer]
    sel, storage = config.selection, config.storage
    t0 = time.perf_counter()
    timings = {}
    deadline = Deadline(config.max_seconds)
    selected = select_layers(model, sel.include, sel.exclude)
    linears = linear_layers(model)
    _check_overrides(sel.overrides, selected, linears)
    if not factorizer.closed_form and storage not in ("fp32", "fp16"):
        raise MixrankError(f"method {config.method!r} stores a sparse term in floating point; use precision "
                           "fp32 or fp16")

    # everything that can be checked from shapes alone fails before any data is read
    shapes = {n: tuple(linears[n].weight.shape) for n in selected}
    unit = "bytes" if config.budget.bytes is not None else "params"
    total = sum(m * n for m, n in shapes.values())
    model_params = sum(p.numel() for p in model.parameters())
    budget = config.budget.bytes_for(total, model_params) if unit == "bytes" else config.budget_params(total)

    pairs = _pairs_of(model, selected, sel.overrides, config)
    pair_forms: dict[str, tuple] = {}  # filled once the pairs' spectra exist

    def spaces_at(precision: str, paired: bool = False):
        return layer_spaces(shapes, sel.rank_step, sel.min_rank, sel.overrides, unit, precision,
                            config.quantize.block, config.quantize.scheme == "symmetric",
                            pair_forms if paired else None)

    _check_feasible(spaces_at, budget, sel.rank_step, storage)
    value_bytes = 2 if storage == "fp16" else 4  # float values: what a sparse term is stored in

    orig_device = next(model.parameters()).device
    device = torch.device(config.device) if config.device else orig_device
    torch.manual_seed(config.seed)
    batches = list(calibration)
    stat_batches, holdout = split_holdout(batches, config.holdout)
    was_training = model.training
    model.eval()
    try:
        model.to(device)
        calib = collect_stats(model, selected, stat_batches, config.token_mask, progress=progress,
                              max_memory=config.max_memory)
        grams = GramView(calib, selected)  # read on demand: a spilled Gram comes from its file each time
        silent = [n for n in selected if not float(calib.layers[n].abs_sum.max()) > 0]
        if silent:
            raise MixrankError(
                f"layer(s) {', '.join(silent[:5])} received only zero inputs on the calibration data, so "
                "nothing says which directions matter; check that the calibration data reaches them "
                "(real inputs, the right preprocessing) or exclude them")
        timings["calibrate_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        weights = {n: linears[n].weight.detach() for n in selected}
        spectra: dict[str, Spectrum] = {}
        for name in tqdm(selected, desc="factor", unit="layer", disable=not progress):
            spectra[name] = factorizer.spectrum(weights[name], calib.layers[name], config)
        paired = pair_spectra(pairs, model, calib.layers, config.damping)
        for name, spec in paired.items():
            partner = next(p for p in paired if p != name and paired[p].pair == spec.pair)
            pair_forms[name] = (spec.form, spec.has_bias_delta, partner, spec.max_rank)
        timings["factor_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        widest = layer_spaces(shapes, sel.rank_step, sel.min_rank, sel.overrides)
        caps = {n: max(sp.cap, sp.fixed or 0) for n, sp in widest.items()}
        work = config.search.work  # multiply-adds per candidate: tokens x the selected layers' parameters
        per_sample = max(calib.tokens_per_sample, 1) * total
        scored = config.search.samples if work is None else min(config.search.samples,
                                                                 max(1, math.ceil(work / per_sample)))
        evaluator = Evaluator(model, spectra, caps, holdout, config.metric, scored,
                              grams, config.quantize, config.token_mask, paired)
        allocation = ALLOCATORS[method.allocator].allocate(spaces_at, budget, config, evaluator, progress,
                                                           deadline=deadline)
        alloc, spaces, cands = allocation.ranks, allocation.spaces, allocation.candidates
        precisions = allocation.precisions
        evaluator.use(spaces)
        chosen_score = evaluator(alloc)
        timings["allocate_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        dense_stored = {n: p for n, p in precisions.items() if alloc[n] is None and p != "fp32"}

        def stored(fits: dict) -> tuple:
            return realize(fits, dense_stored, precisions, config.quantize, grams, weights)

        def score_stored(fits: dict) -> float:
            _, read, read_dense = stored(fits)
            return evaluator.score_fits({**read, **read_dense})

        ctx = RefineContext(model, config, calib, spectra, spaces, alloc, weights, stat_batches,
                            score_stored, evaluator.batches, value_bytes, progress, deadline)
        fits: dict[str, LayerFit] = {}
        for name, r in tqdm([(n, r) for n, r in alloc.items() if r is not None], desc=factorizer.fit_name,
                            unit="layer", disable=not progress or factorizer.closed_form):
            if spaces[name].form != "lowrank":  # a pair's layer: its own closed form
                fits[name] = closed_form_fit(paired[name], r)
                continue
            fits[name] = factorizer.fit(weights[name], calib.layers[name], spectra[name], r,
                                        spaces[name].value_cost(r, value_bytes), config, value_bytes)
        forced = [n for n in fits if "sparse_k" in sel.overrides.get(n, {})]
        for n in forced:  # a forced sparse size holds in every variant, the first included
            fits[n] = split_layer(ctx, n)
        exact = factorizer.closed_form and not forced and storage == "fp32"
        start_score = chosen_score if exact else score_stored(fits)
        start = factorizer.fit_name if fits else allocation.family  # e.g. "dense int8 (quantization alone)"
        chosen_fits, chosen_name, final_score, variants = run_refinements(
            ctx, fits, start, start_score, method.refinements)
        tensors, shipped, _ = stored(chosen_fits)
        if method.refinements or storage != "fp32":  # the error of what ships, as stored
            for n, f in shipped.items():
                if f.form != "lowrank":
                    continue  # a pair's error needs both layers' statistics: the closed form's stays
                st = calib.layers[n]
                f.nmse = nmse(weights[n].to(st.gram.device), f.A.to(st.gram.device),
                              f.B.to(st.gram.device), f.sparse, st.gram, spectra[n].ref)
        timings["refine_s"] = time.perf_counter() - t3
    finally:
        model.to(orig_device)
        model.train(was_training)

    layers_plan = _layer_records(selected, linears, shapes, alloc, spaces, shipped,
                                 {**spectra, **{n: paired[n] for n in paired if spaces[n].form != "lowrank"}},
                                 calib, value_bytes)
    before = sum(i.params_before for i in layers_plan.values())
    after = sum(i.params_after for i in layers_plan.values())
    source = dict(source or {})
    float_storage = storage in ("fp32", "fp16")
    plan = Plan(
        format_version=FORMAT_VERSION,
        method=config.method,
        source=SourceInfo.from_dict({
            "model": source.get("model", type(model).__name__),
            "checkpoint_sha256": model_fingerprint(model),
            **{k: v for k, v in source.items() if k not in ("model", "calibration")}}),
        budget=BudgetInfo(keep=config.budget.keep, params=config.budget.params, bytes=config.budget.bytes,
                          dtype=config.budget.dtype, precision=storage, unit=unit, budget=budget,
                          budget_params=budget if unit == "params" else (budget // value_bytes if float_storage
                                                                         else None),
                          selected_params=total, selected_bytes=4 * total),
        calibration=CalibrationInfo(
            source=source.get("calibration", "in-memory batches"), seed=config.seed, batches=calib.batches,
            samples=calib.samples, holdout_batches=len(holdout),
            holdout_samples=sum(batch_size(b) for b in holdout)),
        config=config.to_dict(),
        layers=layers_plan,
        allocation=AllocationInfo(
            metric=config.metric, family=allocation.family, uniform_score=cands[0]["score"],
            chosen_score=chosen_score,
            refinement=RefinementInfo(variants=variants, chosen=chosen_name, score=final_score),
            evaluations=len(cands), stopped=allocation.stopped,
            scored_samples=sum(batch_size(b) for b in evaluator.batches), candidates=cands),
        totals=Totals(
            params_before=before, params_after=after,
            cost_params=sum(i.cost_params for i in layers_plan.values()),
            cost=sum(i.cost for i in layers_plan.values()),
            bytes_before=4 * before,
            bytes_after=sum(i.bytes_after for i in layers_plan.values()),
            model_params_before=model_params, model_params_after=model_params - before + after),
        limits=deadline.record(),
    )
    return Factors(tensors=tensors, plan=plan, timings={**timings, "total_s": time.perf_counter() - t0})


def _check_feasible(spaces_at, budget: int, step: int, storage: str) -> None:
    """Fail before reading data when no allocation can meet the budget."""
    if storage != "auto":
        uniform_allocation(spaces_at(storage), budget, step)  # raises, naming the feasible range
        return
    for p in AUTO_PRECISIONS:
        spaces = spaces_at(p)
        if feasible_range(spaces)[0] <= budget or alloc_cost(spaces, {n: None for n in spaces}) <= budget:
            return
    lo = feasible_range(spaces_at(AUTO_PRECISIONS[-1]))[0]
    raise MixrankError(f"budget of {budget:,} bytes is below the smallest storage any precision allows for "
                       f"the selected layers ({lo:,} bytes at int4 and the lowest ranks); raise the budget")


def _layer_records(selected: list[str], linears: dict, shapes: dict, alloc: dict, spaces: dict,
                   fits: dict[str, LayerFit], spectra: dict[str, Spectrum], calib: Calibration,
                   value_bytes: int) -> dict[str, LayerPlan]:
    """Each selected layer's plan record (``fits``: the factored layers as stored)."""
    layers: dict[str, LayerPlan] = {}
    for name in selected:
        lin, r, sp_ = linears[name], alloc[name], spaces[name]
        m, n = shapes[name]
        fit = fits.get(name)
        sp = None if fit is None else fit.sparse
        sp_values = 0 if sp is None else sp.values()
        sp_indices = 0 if sp is None else sp.indices()
        sp_cost = 0 if sp is None else sparse_cost(sp.structure, sp.k, m, n, value_bytes)
        form = "lowrank" if fit is None else fit.form
        values = m * n if fit is None else {"lowrank": fit.rank * (m + n), "rows": fit.rank * n,
                                            "cols": m * fit.rank}[form] + sp_values
        new_bias = m if fit is not None and fit.bias is not None and lin.bias is None else 0  # a bias it lacked
        stored_bytes = sp_.stored_bytes(None if fit is None else fit.rank)
        layers[name] = LayerPlan(
            shape=[m, n],
            rank=None if fit is None else fit.rank,
            dense=fit is None,
            precision=sp_.precision,
            sparse=SparsePlan(structure="none" if sp is None else sp.structure, k=0 if sp is None else sp.k,
                              values=sp_values, indices=sp_indices, params=sp_cost),
            nmse=0.0 if fit is None else fit.nmse,
            nmse_closed_form=0.0 if r is None else spectra[name].nmse(r),
            params_before=m * n,
            params_after=values + new_bias,
            cost_params=values if fit is None else (fit.rank * (m + n) + sp_cost if form == "lowrank"
                                                    else values + sp_.extra(fit.rank)),
            cost=sp_.cost(None if fit is None else fit.rank) + (
                0 if sp is None else (sp_cost if sp_.unit == "params" else sp_values * value_bytes + sp_indices * 4)),
            bytes_after=stored_bytes + sp_values * value_bytes + sp_indices * INDEX_BYTES,
            sha256=weight_fingerprint(lin.weight),
            sha256_fp16=weight_fingerprint(lin.weight.detach().half()),
            bias=lin.bias is not None,
            tokens=calib.layers[name].tokens,
            form=form,
            pair=getattr(spectra[name], "pair", "") if form != "lowrank" else "",
            bias_delta=fit is not None and fit.bias is not None,
        )
    return layers


def _pairs_of(model: nn.Module, selected: list[str], overrides: dict, config: CompressConfig) -> list:
    """The pairs of selected layers (none for structure ``lowrank``); a layer with an
    override is left out of pairs.

    Raises:
        MixrankError: structure ``pairs`` on a model in which no rule finds a pair.
    """
    if config.structure == "lowrank":
        return {}
    pairs = find_pairs(model, [n for n in selected if n not in overrides])
    if not pairs and config.structure == "pairs":
        raise MixrankError(f"structure='pairs', but no pair of selected layers was found in {type(model).__name__} "
                           f"(rules: {', '.join(PAIRINGS)}); use structure='auto' or 'lowrank'")
    return pairs
