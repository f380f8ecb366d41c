"""End-to-end distillation of the factors: the last refinement (``distill``).

All factors of the compressed model (``A``, ``B``, the sparse values and a pair's
bias delta; supports, selections, ranks, original biases and every other weight fixed) move jointly by Adam so that the
compressed model's output matches the original's on the calibration batches, in the
metric that scores allocations (normalised MSE of the output by default). The
earlier stages fit each layer, then each block, to the original; only this one sees
how an error anywhere changes the final output. The iterate with the lowest error on
the held-out calibration batches is kept, the starting point included, so it never
ends worse on them than it started.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._limits import distill_steps
from ..artifact import factored_from_fit, fit_from_factored, set_module
from ..calibrate import batch_size, block_sequence, mask_tokens, model_output, move_batch, run_model, slice_batch
from ..calibrate import distributed as _dist
from ..factor import LayerFit
from ..score import loss_normaliser, output_loss, output_loss_sum
from ..store import INT_BITS
from ._guard import REFINEMENTS, Outcome, Refinement
from ._optim import Schedule, descend

CHUNK_TOKENS = 2048  # rows of a step go through the model in pieces of at most this many tokens


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
    token_mask: str | None = None,
    tokens_per_sample: int = 1,
    target: str = "output",
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
        token_mask: key of the padding mask in dict batches: per-token outputs count
            only the real tokens.
        tokens_per_sample: tokens in one sample (its longest sequence): a step's batch
            goes through the model in pieces of at most `CHUNK_TOKENS` tokens, their
            gradients summed, so that the activations kept for the backward pass stay
            small on large models.
        target: what the steps train on: ``"output"`` (the model's output, in
            ``metric``), ``"tokens"`` (every token of the last repeated block's output) or
            ``"blocks"`` (every token of every repeated block's output, concatenated); the
            block targets in normalised MSE with padding excluded (a sentence encoder's
            pooled embedding gives one target row per text, a block one per token). The
            held-out batches always judge by the output in ``metric``.

    Returns:
        (fits at the best held-out iterate, a record: start and best held-out error,
        steps run, step of the best iterate, whether it stopped on time).
    """
    dev = next(model.parameters()).device
    # the copy shares every tensor of the original but the factored layers' (no second copy
    # of a large model in memory); the original's flags are restored on the way out
    flags = [(p, p.requires_grad) for p in model.parameters()]
    comp = copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())}).eval()
    for p in comp.parameters():
        p.requires_grad_(False)
    try:
        return _distill(model, comp, fits, train, held, metric, steps, lr, max_seconds, progress, patience,
                        max_backoffs, stored, token_mask, tokens_per_sample, dev, target)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _distill(model, comp, fits, train, held, metric, steps, lr, max_seconds, progress, patience, max_backoffs,
             stored, token_mask, tokens_per_sample, dev, target):
    mods = {}
    for name, f in fits.items():
        fl = factored_from_fit(f, comp.get_submodule(name))
        fl.fake_quant = (stored or {}).get(name)
        if fl.bias is not None:
            fl.bias.requires_grad_(False)
        set_module(comp, name, fl)
        mods[name] = fl
    params = [p for m in mods.values() for p in (m.A, m.B, m.sparse_value, m.bias_delta) if p is not None]
    sizes = [batch_size(b) for b in held]
    # under torchrun each step's batch is split by rows and each rank's loss is normalised by
    # the whole batch, so the summed gradients are one process's; held-out batches are shared out
    parts = [_dist.row_split(move_batch(b, dev), batch_size(b)) for b in train]
    local_held = _dist.shard(held)
    held = {i: move_batch(held[i], dev) for i in local_held}
    trained = _trained_output(target, model, list(fits), token_mask)
    train_metric = metric if target == "output" else "mse"
    with torch.no_grad():
        ref_train = [trained(model, b).detach() for b, _ in parts]
        ref_held = {i: model_output(model, b, token_mask).detach() for i, b in held.items()}
    norms = [_dist.all_reduce_sum_(loss_normaliser(r, n, train_metric).reshape(1))
             for r, (_, n) in zip(ref_train, parts, strict=True)]
    rows = max(1, CHUNK_TOKENS // max(tokens_per_sample, 1))

    def loss(step: int) -> torch.Tensor:
        i = step % len(parts)
        b, n = parts[i]
        if n <= rows and not _dist.active():
            return output_loss(trained(comp, b), ref_train[i], train_metric)
        # pieces of the batch, each backpropagated at once; the sum is returned detached
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            y = trained(comp, slice_batch(b, lo, hi, n))
            part = output_loss_sum(y, ref_train[i][lo:hi], train_metric) / norms[i][0]
            part.backward()
            total += part.detach()
        return total

    def held_error() -> float:
        with torch.no_grad():
            errs = {i: float(output_loss(model_output(comp, b, token_mask), ref_held[i], metric)) * sizes[i]
                    for i, b in held.items()}
        return sum(_dist.gather_by_index(errs, len(sizes))) / sum(sizes)

    def sync(ps: list[torch.Tensor]) -> None:
        if _dist.active():
            for p in ps:
                if p.grad is not None:
                    _dist.all_reduce_sum_(p.grad)

    every = max(1, min(10, steps // 10))
    sched = Schedule(steps=steps, lr=lr, every=every, warmup=2 * every, patience=patience,
                     max_backoffs=max_backoffs, max_seconds=max_seconds)
    bar = tqdm(total=steps, desc="distill", unit="step", disable=not progress)
    rec = descend(params, loss, held_error, sched, bar, sync=sync)
    bar.close()
    out = {name: fit_from_factored(mods[name], f) for name, f in fits.items()}
    record = {"held_start": rec["start"], "held_best": rec["best"], "steps": rec["steps"],
              "best_step": rec["best_step"], "stopped_on_time": rec["stopped_on_time"],
              "final_lr": rec["final_lr"]}  # no seconds: the plan holds nothing that depends on the clock
    return out, record


def _trained_output(target: str, model: nn.Module, layers: list[str], token_mask: str | None):
    """``f(model, batch)``: the tensor the distillation steps train on (the model's output
    where the layers are not all in one repeated-block container)."""
    found = None if target == "output" else block_sequence(model, layers)
    if found is None:
        return lambda m, b: model_output(m, b, token_mask)
    seq = found[0]

    def block_outputs(m: nn.Module, b) -> torch.Tensor:
        box = []
        blocks = m.get_submodule(seq)
        which = [len(blocks) - 1] if target == "tokens" else range(len(blocks))
        hooks = [blocks[j].register_forward_hook(
            lambda _m, _a, out: box.append(out[0] if isinstance(out, (tuple, list)) else out)) for j in which]
        try:
            run_model(m, b)
        finally:
            for h in hooks:
                h.remove()
        return mask_tokens(torch.cat(box, -1), b, token_mask)  # (batch, tokens, width · blocks)

    return block_outputs


@REFINEMENTS.register("distill")
class Distill(Refinement):
    """All factors tuned jointly on the model's output or its blocks' (`distill`)."""

    settings = ("refine.distill_steps", "refine.distill_lr", "refine.distill_seconds", "refine.distill_work",
                "refine.distill_target")
    switch = "distill_steps"

    def run(self, ctx, fits, chosen):
        cfg = ctx.config
        out, rec = distill(ctx.model, fits, ctx.train, ctx.held, cfg.metric, _steps(ctx),
                           cfg.refine.distill_lr, _cap(ctx, cfg.refine.distill_seconds), progress=ctx.progress,
                           token_mask=cfg.token_mask, tokens_per_sample=int(ctx.tokens_per_sample),
                           target=cfg.refine.distill_target)
        _note(ctx, "distill", rec)
        return Outcome(chosen + "+distill", out, rec)


@REFINEMENTS.register("qdistill")
class QuantAwareDistill(Refinement):
    """Distillation again, through the rounding of the layers stored as integers
    (straight-through), from the chosen fits: a fine-tune for the stored model. It only
    applies when some layer is stored as int8/int4, and ships only if the stored model's
    held-out error falls."""

    settings = ("refine.distill_steps", "refine.distill_lr", "refine.distill_seconds", "refine.distill_work",
                "refine.distill_target")

    def enabled(self, config) -> bool:
        return config.refine.distill_steps > 0 and config.precision in ("int8", "int4", "int2", "auto")

    def run(self, ctx, fits, chosen):
        cfg = ctx.config
        stored = {n: (ctx.spaces[n].precision, cfg.quantize) for n in fits
                  if ctx.spaces[n].precision in INT_BITS}
        if not stored:
            return Outcome("quantization-aware distill", None, note="not applicable: no layer is stored as an integer")
        out, rec = distill(ctx.model, fits, ctx.train, ctx.held, cfg.metric, _steps(ctx),
                           cfg.refine.distill_lr, _cap(ctx, cfg.refine.distill_seconds), progress=ctx.progress,
                           stored=stored, token_mask=cfg.token_mask, tokens_per_sample=int(ctx.tokens_per_sample),
                           target=cfg.refine.distill_target)
        _note(ctx, "qdistill", rec)
        return Outcome(chosen + "+qdistill", out, rec)


def _steps(ctx) -> int:
    """``distill_steps``, cut by ``distill_work`` (`mixrank.compress._limits.distill_steps`)."""
    cfg = ctx.config.refine
    return distill_steps(cfg.distill_steps, cfg.distill_work, ctx.tokens_per_sample,
                         sum(batch_size(b) for b in ctx.train), len(ctx.train),
                         sum(w.numel() for w in ctx.weights.values()))


def _cap(ctx, own: float | None) -> float | None:
    return own if ctx.deadline is None else ctx.deadline.cap(own)


def _note(ctx, stage: str, rec: dict) -> None:
    if ctx.deadline is not None:
        ctx.deadline.note(stage, rec["stopped_on_time"])
