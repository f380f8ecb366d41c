"""End-to-end distillation of the factors: the last refinement (``distill``).

All factors of the compressed model (``A``, ``B`` and the sparse values; supports,
ranks, biases and every other weight fixed) move jointly by Adam so that the
compressed model's output matches the original's on the calibration batches, in the
metric that scores allocations (normalised MSE of the output by default). The
earlier stages fit each layer, then each block, to the original; only this one sees
how an error anywhere changes the final output. The iterate with the lowest error on
the held-out calibration batches is kept, the starting point included, so it never
ends worse on them than it started.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._batches import batch_size, first_tensor, move_batch, run_model
from ._fit import LayerFit
from ._optim import Schedule, descend
from ._refine import REFINEMENTS, Outcome, Refinement
from ._scoring import output_loss


def distill(
    model: nn.Module,
    fits: dict[str, LayerFit],
    train: list,
    held: list,
    metric: str,
    steps: int,
    lr: float,
    max_seconds: float | None = None,
    progress: bool = True,
    patience: int = 3,
    max_backoffs: int = 6,
    stored: dict[str, tuple] | None = None,
) -> tuple[dict[str, LayerFit], dict]:
    """Refine ``fits`` end to end.

    Args:
        model: the original model (not modified).
        fits: per-layer fits to start from (other selected layers stay dense).
        train: batches the factors are trained on (the statistics part).
        held: held-out batches choosing the iterate kept.
        metric: output error (``"auto"``, ``"kl"``, ``"mse"``, ``"cosine"``).
        steps: Adam steps (one batch each, cycling through ``train``).
        lr: learning rate relative to each tensor's mean magnitude.
        max_seconds: wall-clock bound (``None``: none).
        patience, max_backoffs: scores without improvement before the step size is cut
            to a third (back at the best iterate), and how often that may happen.
        stored: layer → (precision, `Quantize`) of layers to train as they will be
            stored (straight-through rounding); others train in float32.

    Returns:
        (fits at the best held-out iterate, a record: start and best held-out error,
        steps run, step of the best iterate, whether it stopped on time).
    """
    from ._factored import FactoredLinear, _set_module, factored_from_fit, fit_from_factored

    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    comp = copy.deepcopy(model).eval()
    for p in comp.parameters():
        p.requires_grad_(False)
    mods: dict[str, FactoredLinear] = {}
    for name, f in fits.items():
        fl = factored_from_fit(f, comp.get_submodule(name))
        fl.fake_quant = (stored or {}).get(name)
        if fl.bias is not None:
            fl.bias.requires_grad_(False)
        _set_module(comp, name, fl)
        mods[name] = fl
    params = [p for m in mods.values() for p in (m.A, m.B, m.sparse_value) if p is not None]
    train = [move_batch(b, dev) for b in train]
    held = [move_batch(b, dev) for b in held]
    with torch.no_grad():
        ref_train = [first_tensor(run_model(model, b)).detach() for b in train]
        ref_held = [first_tensor(run_model(model, b)).detach() for b in held]
    sizes = [batch_size(b) for b in held]

    def loss(step: int) -> torch.Tensor:
        i = step % len(train)
        return output_loss(first_tensor(run_model(comp, train[i])), ref_train[i], metric)

    def held_error() -> float:
        with torch.no_grad():
            errs = [float(output_loss(first_tensor(run_model(comp, b)), r, metric)) * s
                    for b, r, s in zip(held, ref_held, sizes, strict=True)]
        return sum(errs) / sum(sizes)

    every = max(1, min(10, steps // 10))
    sched = Schedule(steps=steps, lr=lr, every=every, warmup=2 * every, patience=patience,
                     max_backoffs=max_backoffs, max_seconds=max_seconds)
    bar = tqdm(total=steps, desc="distill", unit="step", disable=not progress)
    rec = descend(params, loss, held_error, sched, bar)
    bar.close()
    out = {name: fit_from_factored(mods[name], f) for name, f in fits.items()}
    record = {"held_start": rec["start"], "held_best": rec["best"], "steps": rec["steps"],
              "best_step": rec["best_step"], "stopped_on_time": rec["stopped_on_time"],
              "final_lr": rec["final_lr"], "seconds": time.perf_counter() - t0}
    return out, record


@REFINEMENTS.register("distill")
class Distill(Refinement):
    """All factors tuned jointly on the model's output (`distill`)."""

    settings = ("refine.distill_steps", "refine.distill_lr", "refine.distill_seconds")
    switch = "distill_steps"

    def run(self, ctx, fits, chosen):
        cfg = ctx.config
        out, rec = distill(ctx.model, fits, ctx.train, ctx.held, cfg.metric, cfg.refine.distill_steps,
                           cfg.refine.distill_lr, cfg.refine.distill_seconds, progress=ctx.progress)
        return Outcome(chosen + "+distill", out, rec)


@REFINEMENTS.register("qdistill")
class QuantAwareDistill(Refinement):
    """Distillation again, through the rounding of the layers stored as integers
    (straight-through), from the chosen fits: a fine-tune for the stored model. It only
    applies when some layer is stored as int8/int4, and ships only if the stored model's
    held-out error falls."""

    settings = ("refine.distill_steps", "refine.distill_lr", "refine.distill_seconds")

    def enabled(self, config) -> bool:
        return config.refine.distill_steps > 0 and config.storage in ("int8", "int4", "auto")

    def run(self, ctx, fits, chosen):
        cfg = ctx.config
        stored = {n: (ctx.spaces[n].precision, cfg.quantize) for n in fits
                  if ctx.spaces[n].precision in ("int8", "int4")}
        if not stored:
            return Outcome("quantization-aware distill", None, note="not applicable: no layer is stored as an integer")
        out, rec = distill(ctx.model, fits, ctx.train, ctx.held, cfg.metric, cfg.refine.distill_steps,
                           cfg.refine.distill_lr, cfg.refine.distill_seconds, progress=ctx.progress, stored=stored)
        return Outcome(chosen + "+qdistill", out, rec)
