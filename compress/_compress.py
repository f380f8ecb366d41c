"""`compress_model`: calibration → factorization → allocation → `Factors`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._allocate import (
    Evaluator,
    alloc_cost,
    layer_spaces,
    search_allocation,
    uniform_allocation,
)
from ._baselines import asvd_spectrum, oats_fit
from ._calibrate import Batch, batch_size, collect_stats, slice_batch
from ._config import DTYPE_BYTES, CompressConfig
from ._distill import distill
from ._errors import MixrankError, close_matches
from ._factor import Spectrum, plain_spectrum, whitened_spectrum
from ._factors import Factors, weight_fingerprint
from ._fit import LayerFit, compensate, fit_layer, nmse
from ._select import linear_layers, select_layers
from ._sequential import sequential_refit
from ._sparse import INDEX_BYTES, largest_k, sparse_cost


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


def split_holdout(batches: list, fraction: float) -> tuple[list, list]:
    """(statistics batches, held-out batches): the last ``fraction`` of the batches,
    or of the samples of a single batch."""
    if not batches:
        raise MixrankError("the calibration data is empty: give at least one batch")
    if len(batches) >= 2:
        h = min(max(1, round(len(batches) * fraction)), len(batches) - 1)
        return batches[:-h], batches[-h:]
    size = batch_size(batches[0])
    if size < 2:
        raise MixrankError(
            "one calibration sample is not enough: mixrank holds out part of the calibration "
            "data to score allocations; give at least 2 samples"
        )
    cut = min(max(1, round(size * (1 - fraction))), size - 1)
    return [slice_batch(batches[0], 0, cut, size)], [slice_batch(batches[0], cut, size, size)]


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


def _has_sparse_k(config: CompressConfig) -> bool:
    return any("sparse_k" in ov for ov in config.overrides.values())


def _best_split(name: str, W: torch.Tensor, G: torch.Tensor, spec: Spectrum, space, rank: int,
                config: CompressConfig, value_bytes: int) -> LayerFit:
    """Split a layer's allocated cost between rank and the sparse term: try giving
    0..sparse_splits rank steps to the sparse term (or the override's sparse_k), keep
    the split with the lowest layer error, then alternate on it."""
    m, n = space.m, space.n
    cost = space.cost(rank)
    forced = config.overrides.get(name, {}).get("sparse_k")
    options = []
    if forced is not None:
        left = cost - sparse_cost(config.sparse, forced, m, n, value_bytes)
        r = min(rank, left // (m + n)) if left > 0 else 0
        if r < 1:
            raise MixrankError(
                f"override {name!r}: sparse_k={forced} leaves no room for a rank >= 1 within "
                f"the layer's budget of {cost:,} parameters")
        options.append((r, forced))
    else:
        for j in range(config.sparse_splits + 1):
            r = rank - j * config.rank_step
            if r < max(1, space.floor if space.free else 1):
                break
            k = largest_k(config.sparse, cost - r * (m + n), m, n, value_bytes)
            if j == 0 or k > 0:
                options.append((r, k))
    best = None
    for r, k in options:
        f = fit_layer(W, G, r, config.sparse, k, config.damping, 0, spec)
        if best is None or f.nmse < best[0].nmse:
            best = (f, r, k)
    f, r, k = best
    if k > 0 and config.alternate > 0:
        f = fit_layer(W, G, r, config.sparse, k, config.damping, config.alternate, spec)
    return f


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
    source = dict(source or {})
    t0 = time.perf_counter()
    timings = {}
    selected = select_layers(model, config.include, config.exclude)
    linears = linear_layers(model)
    _check_overrides(config.overrides, selected, linears)

    # everything that can be checked from shapes alone fails before any data is read
    shapes = {n: tuple(linears[n].weight.shape) for n in selected}
    spaces = layer_spaces(shapes, config.rank_step, config.min_rank, config.overrides)
    total = sum(m * n for m, n in shapes.values())
    budget = config.budget_params(total)
    uniform_allocation(spaces, budget, config.rank_step)  # raises on an infeasible budget

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
        spectra: dict[str, Spectrum] = {}
        for name in tqdm(selected, desc="factor", unit="layer", disable=not progress):
            W = linears[name].weight.detach()
            st = calib.layers[name]
            if config.method == "svd":
                spectra[name] = plain_spectrum(W.to(st.gram.device), st.gram)
            elif config.method == "asvd":
                spectra[name] = asvd_spectrum(W, st.gram, st.abs_mean)
            else:
                spectra[name] = whitened_spectrum(W, st.gram, config.damping)
        timings["factor_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        evaluator = Evaluator(model, spectra, spaces, holdout, config.metric,
                              config.search_samples)
        stop = "uniform"
        if config.method == "mixrank":
            alloc, cands, stop = search_allocation(
                spaces, budget, config.rank_step, evaluator, config.search_rounds,
                config.search_evals, config.search_seconds, progress=progress,
            )
        else:
            alloc = uniform_allocation(spaces, budget, config.rank_step)
            cands = [{"name": "uniform", "score": evaluator(alloc),
                      "params": alloc_cost(spaces, alloc), "ranks": dict(alloc)}]
        chosen_score = evaluator(alloc)
        timings["allocate_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        fits = {}
        for name, r in alloc.items():
            if r is not None:
                A, B = spectra[name].factors(r)
                fits[name] = LayerFit(A, B, None, spectra[name].nmse(r), [spectra[name].nmse(r)])
        variants = [{"name": "closed_form", "score": chosen_score}]
        chosen_fits, chosen_name = fits, "closed_form"
        value_bytes = DTYPE_BYTES[config.dtype]
        W_of = {n: linears[n].weight.detach() for n in fits}
        if config.method == "oats":
            fits = {n: oats_fit(W_of[n], calib.layers[n].gram, calib.layers[n].tokens,
                                spaces[n].cost(alloc[n]), value_bytes, step=config.rank_step)
                    for n in tqdm(list(fits), desc="oats", unit="layer", disable=not progress)}
            chosen_fits, chosen_name = fits, "oats"
            variants = [{"name": "oats", "score": evaluator.score_fits(fits)}]
        if config.method == "mixrank":
            if config.sparse != "none" and (config.sparse_splits > 0 or _has_sparse_k(config)):
                sparse_fits = {}
                for n in tqdm(list(fits), desc=f"sparse ({config.sparse})", unit="layer",
                              disable=not progress):
                    sparse_fits[n] = _best_split(
                        n, W_of[n], calib.layers[n].gram, spectra[n], spaces[n], alloc[n],
                        config, value_bytes)
                forced = [n for n in fits if "sparse_k" in config.overrides.get(n, {})]
                if forced:  # a forced sparse size holds in every variant, closed form included
                    fits = {**fits, **{n: sparse_fits[n] for n in forced}}
                    variants[0]["score"] = evaluator.score_fits(fits)
                    chosen_fits = fits
                variants.append({"name": f"sparse_{config.sparse}",
                                 "score": evaluator.score_fits(sparse_fits)})
                if variants[-1]["score"] < variants[0]["score"]:
                    chosen_fits, chosen_name = sparse_fits, variants[-1]["name"]
            if config.compensate_steps > 0:
                comp = {}
                for n in tqdm(list(chosen_fits), desc="compensate", unit="layer",
                              disable=not progress):
                    comp[n] = compensate(chosen_fits[n], W_of[n], calib.layers[n].gram,
                                         spectra[n].ref, config.compensate_steps,
                                         config.compensate_lr, config.damping)
                variants.append({"name": chosen_name + "+compensate",
                                 "score": evaluator.score_fits(comp)})
                if variants[-1]["score"] < min(v["score"] for v in variants[:-1]):
                    chosen_fits, chosen_name = comp, variants[-1]["name"]

            if config.sequential:
                base = chosen_fits

                def refit(name: str, Wt: torch.Tensor, Gcc: torch.Tensor) -> LayerFit:
                    b = base[name]
                    sp = b.sparse
                    f = fit_layer(Wt, Gcc, b.rank, "none" if sp is None else sp.structure,
                                  0 if sp is None else sp.k, config.damping, config.alternate)
                    if config.compensate_steps > 0 and chosen_name.endswith("compensate"):
                        ref = float(torch.einsum("ij,jk,ik->", Wt, Gcc, Wt))
                        f = compensate(f, Wt, Gcc, ref, config.compensate_steps,
                                       config.compensate_lr, config.damping)
                    return f

                seq = sequential_refit(model, list(base), stat_batches, refit, config.damping,
                                       progress=progress, block_steps=config.block_steps,
                                       block_lr=config.block_lr,
                                       block_seconds=config.block_seconds)
                if seq is None:
                    variants.append({"name": "sequential", "score": None,
                                     "note": "not applicable: blocks cannot be run in sequence"})
                else:
                    seq = {**base, **seq}
                    tag = "+sequential" + ("+block" if config.block_steps else "")
                    variants.append({"name": chosen_name + tag,
                                     "score": evaluator.score_fits(seq)})
                    if variants[-1]["score"] < min(v["score"] for v in variants[:-1]
                                                   if v["score"] is not None):
                        chosen_fits, chosen_name = seq, variants[-1]["name"]
            if config.distill_steps > 0 and chosen_fits:
                dist, rec = distill(model, chosen_fits, stat_batches, evaluator.batches,
                                    config.metric, config.distill_steps, config.distill_lr,
                                    config.distill_seconds, progress=progress)
                variants.append({"name": chosen_name + "+distill",
                                 "score": evaluator.score_fits(dist), **rec})
                if variants[-1]["score"] < min(v["score"] for v in variants[:-1]
                                               if v["score"] is not None):
                    chosen_fits, chosen_name = dist, variants[-1]["name"]
            # stages that move factors without tracking the layer error: measure it again
            for n, f in chosen_fits.items():
                st = calib.layers[n]
                f.nmse = nmse(W_of[n].to(st.gram.device), f.A.to(st.gram.device),
                              f.B.to(st.gram.device), f.sparse, st.gram, spectra[n].ref)
        final_score = next(v["score"] for v in variants if v["name"] == chosen_name)
        timings["refine_s"] = time.perf_counter() - t3
    finally:
        model.to(orig_device)
        model.train(was_training)

    tensors: dict[str, torch.Tensor] = {}
    layers_plan = {}
    for name in selected:
        lin, r = linears[name], alloc[name]
        m, n = shapes[name]
        fit = chosen_fits.get(name)
        sp = None if fit is None else fit.sparse
        sp_values = 0 if sp is None else sp.values()
        sp_indices = 0 if sp is None else sp.indices()
        sp_cost = 0 if sp is None else sparse_cost(sp.structure, sp.k, m, n, value_bytes)
        values = m * n if fit is None else fit.rank * (m + n) + sp_values
        info = {
            "shape": [m, n],
            "rank": None if fit is None else fit.rank,
            "dense": fit is None,
            "sparse": {"structure": "none" if sp is None else sp.structure,
                       "k": 0 if sp is None else sp.k, "values": sp_values,
                       "indices": sp_indices, "params": sp_cost},
            "nmse": 0.0 if fit is None else fit.nmse,
            "nmse_closed_form": 0.0 if r is None else spectra[name].nmse(r),
            "params_before": m * n,
            "params_after": values,
            "cost_params": values if fit is None else fit.rank * (m + n) + sp_cost,
            "bytes_after": values * value_bytes + sp_indices * INDEX_BYTES,
            "sha256": weight_fingerprint(lin.weight),
            "sha256_fp16": weight_fingerprint(lin.weight.detach().half()),
            "bias": lin.bias is not None,
            "tokens": calib.layers[name].tokens,
        }
        layers_plan[name] = info
        if fit is not None:
            tensors[f"{name}.A"] = fit.A.detach().cpu().float().contiguous()
            tensors[f"{name}.B"] = fit.B.detach().cpu().float().contiguous()
            if sp is not None:
                tensors[f"{name}.sparse_index"] = sp.index.detach().cpu().to(torch.int32).contiguous()
                tensors[f"{name}.sparse_value"] = sp.value.detach().cpu().float().contiguous()
    model_params = sum(p.numel() for p in model.parameters())
    before = sum(i["params_before"] for i in layers_plan.values())
    after = sum(i["params_after"] for i in layers_plan.values())
    uniform_score = cands[0]["score"]
    plan = {
        "format_version": config.format_version,
        "method": config.method,
        "source": {
            "model": source.get("model", type(model).__name__),
            "checkpoint_sha256": model_fingerprint(model),
            **{k: v for k, v in source.items() if k not in ("model", "calibration")},
        },
        "budget": {
            "keep": config.keep, "params": config.params, "bytes": config.bytes,
            "dtype": config.dtype, "budget_params": budget, "selected_params": total,
        },
        "calibration": {
            "source": source.get("calibration", "in-memory batches"),
            "seed": config.seed,
            "batches": calib.batches,
            "samples": calib.samples,
            "holdout_batches": len(holdout),
            "holdout_samples": sum(batch_size(b) for b in holdout),
        },
        "config": config.to_dict(),
        "layers": layers_plan,
        "allocation": {
            "metric": config.metric,
            "uniform_score": uniform_score,
            "chosen_score": chosen_score,
            "refinement": {"variants": variants, "chosen": chosen_name, "score": final_score},
            "evaluations": len(cands),
            "stopped": stop,
            "scored_samples": sum(batch_size(b) for b in evaluator.batches),
            "candidates": cands,
        },
        "totals": {
            "params_before": before,
            "params_after": after,
            "cost_params": sum(i["cost_params"] for i in layers_plan.values()),
            "bytes_before": before * value_bytes,
            "bytes_after": sum(i["bytes_after"] for i in layers_plan.values()),
            "model_params_before": model_params,
            "model_params_after": model_params - before + after,
        },
        "timings": {**timings, "total_s": time.perf_counter() - t0},
    }
    return Factors(tensors=tensors, plan=plan)
