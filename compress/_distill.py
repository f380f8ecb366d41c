"""End-to-end distillation of the factors: the last refinement.

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
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._allocate import first_tensor
from ._calibrate import batch_size, move_batch, run_model
from ._fit import LayerFit


def output_loss(y: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """Differentiable twin of `output_error` (mean over the batch). In float64: a
    well-compressed model's KL (1e-6 and below) is under float32's rounding noise
    of ``Σ p (log p − log q)``."""
    y, ref = y.double(), ref.double()
    if metric == "auto":
        metric = "mse"
    if metric == "kl":
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(y, -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    if metric == "mse":
        return ((y - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30)
    return 1.0 - F.cosine_similarity(y.flatten(1), ref.flatten(1), dim=-1).mean()


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

    def held_error() -> float:
        with torch.no_grad():
            errs = [float(output_loss(first_tensor(run_model(comp, b)), r, metric)) * s
                    for b, r, s in zip(held, ref_held, sizes, strict=True)]
        return sum(errs) / sum(sizes)

    scale = [float(p.detach().abs().mean() + 1e-12) for p in params]
    warm = 2 * max(1, min(10, steps // 10))  # steps of linear warm-up after every (re)start

    def make_opt(rate: float) -> torch.optim.Adam:
        opt = torch.optim.Adam([{"params": [p], "lr": rate * s} for p, s in zip(params, scale, strict=True)])
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        return opt

    rate = lr
    opt = make_opt(rate)
    start = best = held_error()
    best_state = [p.detach().clone() for p in params]
    best_step, done, timed_out, bad, backoffs, since = 0, 0, False, 0, 0, 0
    every = max(1, min(10, steps // 10))
    bar = tqdm(total=steps, desc="distill", unit="step", disable=not progress)
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            timed_out = True
            break
        i = step % len(train)
        since += 1
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * min(1.0, since / warm)
        opt.zero_grad(set_to_none=True)
        loss = output_loss(first_tensor(run_model(comp, train[i])), ref_train[i], metric)
        loss.backward()
        opt.step()
        done = step + 1
        bar.update(1)
        if done % every and done != steps:
            continue
        e = held_error()
        if e < best:
            best, best_step, bad = e, done, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
        bar.set_postfix(held=f"{best:.3g}", lr=f"{rate:.1e}")
        if bad >= patience:  # back to the best iterate with a smaller step
            if backoffs == max_backoffs:
                break
            with torch.no_grad():
                for p, v in zip(params, best_state, strict=True):
                    p.copy_(v)
            rate, bad, backoffs, since = rate / 3, 0, backoffs + 1, 0
            opt = make_opt(rate)
    bar.close()
    with torch.no_grad():
        for p, v in zip(params, best_state, strict=True):
            p.copy_(v)
    out = {name: fit_from_factored(mods[name], f) for name, f in fits.items()}
    record = {"held_start": start, "held_best": best, "steps": done, "best_step": best_step,
              "stopped_on_time": timed_out, "final_lr": rate, "seconds": time.perf_counter() - t0}
    return out, record
