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
from ._calibrate import Batch, batch_size, collect_stats, slice_batch
from ._config import CompressConfig
from ._errors import MixrankError, close_matches
from ._factor import Spectrum, plain_spectrum, whitened_spectrum
from ._factors import Factors, weight_fingerprint
from ._select import linear_layers, select_layers


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


def _check_overrides(overrides: dict, selected: list[str], linears: list[str]) -> None:
    for name in overrides:
        if name not in selected:
            where = "is a Linear layer but not selected (add it to include)" if name in linears \
                else f"names no Linear layer{close_matches(name, linears)}"
            raise MixrankError(f"override {name!r} {where}")


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
    _check_overrides(config.overrides, selected, list(linears))

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
            G = calib.layers[name].gram
            if config.method == "svd":
                spectra[name] = plain_spectrum(W.to(G.device), G)
            else:
                spectra[name] = whitened_spectrum(W, G, config.damping)
        timings["factor_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        shapes = {n: tuple(linears[n].weight.shape) for n in selected}
        spaces = layer_spaces(shapes, config.rank_step, config.min_rank, config.overrides)
        total = sum(m * n for m, n in shapes.values())
        budget = config.budget_params(total)
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
    finally:
        model.to(orig_device)
        model.train(was_training)

    tensors: dict[str, torch.Tensor] = {}
    layers_plan = {}
    for name in selected:
        lin, sp, r = linears[name], spaces[name], alloc[name]
        m, n = shapes[name]
        info = {
            "shape": [m, n],
            "rank": r,
            "dense": r is None,
            "sparse": {"structure": "none", "k": 0, "params": 0},
            "nmse": 0.0 if r is None else spectra[name].nmse(r),
            "params_before": m * n,
            "params_after": sp.cost(r),
            "sha256": weight_fingerprint(lin.weight),
            "bias": lin.bias is not None,
            "tokens": calib.layers[name].tokens,
        }
        layers_plan[name] = info
        if r is not None:
            A, B = spectra[name].factors(r)
            tensors[f"{name}.A"] = A.cpu().float()
            tensors[f"{name}.B"] = B.cpu().float()
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
            "evaluations": len(cands),
            "stopped": stop,
            "scored_samples": sum(batch_size(b) for b in evaluator.batches),
            "candidates": cands,
        },
        "totals": {
            "params_before": before,
            "params_after": after,
            "model_params_before": model_params,
            "model_params_after": model_params - before + after,
        },
        "timings": {**timings, "total_s": time.perf_counter() - t0},
    }
    return Factors(tensors=tensors, plan=plan)
