"""`compress_model`: calibration → factorization → allocation → refinements → `Factors`.

Every step is looked up by name in its registry (`METHODS` names the factorizer, the
allocator and the refinements of a method), so this file does not change when one is
added (docs/design.md, "Architecture").
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._allocate import ALLOCATORS, layer_spaces, uniform_allocation
from ._batches import Batch, batch_size, split_holdout
from ._calibrate import Calibration, collect_stats
from ._config import DTYPE_BYTES, CompressConfig
from ._errors import MixrankError, close_matches
from ._factor import Spectrum
from ._factorizers import FACTORIZERS
from ._factors import Factors, weight_fingerprint
from ._fit import LayerFit, nmse
from ._methods import METHODS
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
    sel = config.selection
    t0 = time.perf_counter()
    timings = {}
    selected = select_layers(model, sel.include, sel.exclude)
    linears = linear_layers(model)
    _check_overrides(sel.overrides, selected, linears)

    # everything that can be checked from shapes alone fails before any data is read
    shapes = {n: tuple(linears[n].weight.shape) for n in selected}
    spaces = layer_spaces(shapes, sel.rank_step, sel.min_rank, sel.overrides)
    total = sum(m * n for m, n in shapes.values())
    budget = config.budget_params(total)
    uniform_allocation(spaces, budget, sel.rank_step)  # raises on an infeasible budget
    value_bytes = DTYPE_BYTES[config.budget.dtype]

    orig_device = next(model.parameters()).device
    device = torch.device(config.device) if config.device else orig_device
    torch.manual_seed(config.seed)
    batches = list(calibration)
    stat_batches, holdout = split_holdout(batches, config.holdout)
    was_training = model.training
    model.eval()
    try:
        model.to(device)
        calib = collect_stats(model, selected, stat_batches, config.token_mask, progress=progress)
        timings["calibrate_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        weights = {n: linears[n].weight.detach() for n in selected}
        spectra: dict[str, Spectrum] = {}
        for name in tqdm(selected, desc="factor", unit="layer", disable=not progress):
            spectra[name] = factorizer.spectrum(weights[name], calib.layers[name], config)
        timings["factor_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        caps = {n: max(sp.cap, sp.fixed or 0) for n, sp in spaces.items()}
        evaluator = Evaluator(model, spectra, caps, holdout, config.metric, config.search.samples)
        alloc, cands, stop = ALLOCATORS[method.allocator].allocate(spaces, budget, config, evaluator,
                                                                   progress=progress)
        chosen_score = evaluator(alloc)
        timings["allocate_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        ctx = RefineContext(model, config, calib, spectra, spaces, alloc, weights, stat_batches,
                            evaluator.score_fits, evaluator.batches, value_bytes, progress)
        fits: dict[str, LayerFit] = {}
        for name, r in tqdm([(n, r) for n, r in alloc.items() if r is not None], desc=factorizer.fit_name,
                            unit="layer", disable=not progress or factorizer.closed_form):
            fits[name] = factorizer.fit(weights[name], calib.layers[name], spectra[name], r,
                                        spaces[name].cost(r), config, value_bytes)
        forced = [n for n in fits if "sparse_k" in sel.overrides.get(n, {})]
        for n in forced:  # a forced sparse size holds in every variant, the first included
            fits[n] = split_layer(ctx, n)
        start_score = chosen_score if factorizer.closed_form and not forced else evaluator.score_fits(fits)
        chosen_fits, chosen_name, final_score, variants = run_refinements(
            ctx, fits, factorizer.fit_name, start_score, method.refinements)
        if method.refinements:  # stages that move factors without tracking the layer error
            for n, f in chosen_fits.items():
                st = calib.layers[n]
                f.nmse = nmse(weights[n].to(st.gram.device), f.A.to(st.gram.device),
                              f.B.to(st.gram.device), f.sparse, st.gram, spectra[n].ref)
        timings["refine_s"] = time.perf_counter() - t3
    finally:
        model.to(orig_device)
        model.train(was_training)

    tensors, layers_plan = _layer_records(selected, linears, shapes, alloc, chosen_fits, spectra, calib,
                                          value_bytes)
    model_params = sum(p.numel() for p in model.parameters())
    before = sum(i.params_before for i in layers_plan.values())
    after = sum(i.params_after for i in layers_plan.values())
    source = dict(source or {})
    plan = Plan(
        format_version=FORMAT_VERSION,
        method=config.method,
        source=SourceInfo.from_dict({
            "model": source.get("model", type(model).__name__),
            "checkpoint_sha256": model_fingerprint(model),
            **{k: v for k, v in source.items() if k not in ("model", "calibration")}}),
        budget=BudgetInfo(keep=config.budget.keep, params=config.budget.params, bytes=config.budget.bytes,
                          dtype=config.budget.dtype, budget_params=budget, selected_params=total),
        calibration=CalibrationInfo(
            source=source.get("calibration", "in-memory batches"), seed=config.seed, batches=calib.batches,
            samples=calib.samples, holdout_batches=len(holdout),
            holdout_samples=sum(batch_size(b) for b in holdout)),
        config=config.to_dict(),
        layers=layers_plan,
        allocation=AllocationInfo(
            metric=config.metric, uniform_score=cands[0]["score"], chosen_score=chosen_score,
            refinement=RefinementInfo(variants=variants, chosen=chosen_name, score=final_score),
            evaluations=len(cands), stopped=stop,
            scored_samples=sum(batch_size(b) for b in evaluator.batches), candidates=cands),
        totals=Totals(
            params_before=before, params_after=after,
            cost_params=sum(i.cost_params for i in layers_plan.values()),
            bytes_before=before * value_bytes,
            bytes_after=sum(i.bytes_after for i in layers_plan.values()),
            model_params_before=model_params, model_params_after=model_params - before + after),
        timings={**timings, "total_s": time.perf_counter() - t0},
    )
    return Factors(tensors=tensors, plan=plan)


def _layer_records(selected: list[str], linears: dict, shapes: dict, alloc: dict, fits: dict[str, LayerFit],
                   spectra: dict[str, Spectrum], calib: Calibration,
                   value_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, LayerPlan]]:
    """The factor tensors and each selected layer's plan record."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerPlan] = {}
    for name in selected:
        lin, r = linears[name], alloc[name]
        m, n = shapes[name]
        fit = fits.get(name)
        sp = None if fit is None else fit.sparse
        sp_values = 0 if sp is None else sp.values()
        sp_indices = 0 if sp is None else sp.indices()
        sp_cost = 0 if sp is None else sparse_cost(sp.structure, sp.k, m, n, value_bytes)
        values = m * n if fit is None else fit.rank * (m + n) + sp_values
        layers[name] = LayerPlan(
            shape=[m, n],
            rank=None if fit is None else fit.rank,
            dense=fit is None,
            sparse=SparsePlan(structure="none" if sp is None else sp.structure, k=0 if sp is None else sp.k,
                              values=sp_values, indices=sp_indices, params=sp_cost),
            nmse=0.0 if fit is None else fit.nmse,
            nmse_closed_form=0.0 if r is None else spectra[name].nmse(r),
            params_before=m * n,
            params_after=values,
            cost_params=values if fit is None else fit.rank * (m + n) + sp_cost,
            bytes_after=values * value_bytes + sp_indices * INDEX_BYTES,
            sha256=weight_fingerprint(lin.weight),
            sha256_fp16=weight_fingerprint(lin.weight.detach().half()),
            bias=lin.bias is not None,
            tokens=calib.layers[name].tokens,
        )
        if fit is not None:
            tensors[f"{name}.A"] = fit.A.detach().cpu().float().contiguous()
            tensors[f"{name}.B"] = fit.B.detach().cpu().float().contiguous()
            if sp is not None:
                tensors[f"{name}.sparse_index"] = sp.index.detach().cpu().to(torch.int32).contiguous()
                tensors[f"{name}.sparse_value"] = sp.value.detach().cpu().float().contiguous()
    return tensors, layers
