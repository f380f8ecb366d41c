"""The one gradient loop of mixrank's refinements.

Compensation, block reconstruction and distillation all run Adam with a learning rate
relative to each tensor's mean magnitude and ship the best iterate on a score they do
not train on (or, for a full-batch objective, the best objective seen). `descend` is
that loop; the refinements only say what the loss and the score are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


class Deadline:
    """The wall-clock cap a user asked for (``max_seconds``; ``None``: none, the default).

    Without a cap every bound is a count of work (steps, evaluations), so the same inputs
    give the same factors on any machine under any load. With one, each stage gets a
    bound from the time left, and the stages that stopped on it are named (`hit`): the
    plan records them, because such a result depends on the machine.
    """

    def __init__(self, seconds: float | None = None):
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.hit: list[str] = []

    def cap(self, own: float | None, share: float = 1.0) -> float | None:
        """A stage's bound: its own setting, within ``share`` of the time left."""
        if self.seconds is None:
            return own
        left = max(0.0, self.t0 + self.seconds - time.monotonic()) * share
        return left if own is None else min(own, left)

    def note(self, stage: str, stopped: bool) -> None:
        if stopped and stage not in self.hit:
            self.hit.append(stage)

    def record(self) -> dict:
        return {"max_seconds": self.seconds, "stopped_on_time": list(self.hit)}


@dataclass
class Schedule:
    """How `descend` runs.

    Attributes:
        steps: Adam steps (one call of the training loss each).
        lr: learning rate relative to each tensor's mean magnitude.
        every: score every this many steps (and after the last one).
        warmup: steps of linear warm-up after the start and after every back-off (0: none).
        patience: scores without improvement before backing off to the best iterate with
            a third of the step size (``None``: never).
        max_backoffs: back-offs allowed before stopping.
        max_seconds: wall-clock bound (``None``: none).
    """

    steps: int
    lr: float
    every: int = 1
    warmup: int = 0
    patience: int | None = None
    max_backoffs: int = 0
    max_seconds: float | None = None


def descend(params: list[torch.Tensor], loss: Callable[[int], torch.Tensor],
            score: Callable[[], float] | None, sched: Schedule, bar=None,
            sync: Callable[[list[torch.Tensor]], None] | None = None) -> dict:
    """Minimise ``loss(step)`` over ``params`` by Adam; leave ``params`` at the best iterate.

    Args:
        params: leaf tensors with ``requires_grad``; each gets the learning rate
            ``sched.lr · mean|p|`` (its own Adam parameter group).
        loss: the training loss of step ``i`` (for example on batch ``i % len(train)``);
            it may run its own backward passes (a batch in pieces) and return their sum
            detached.
        score: the error that picks the iterate kept (held-out data), evaluated at the
            start and every ``sched.every`` steps. ``None``: the loss is a full-batch
            objective and is its own score, read from each step's forward pass (no extra
            evaluation); the state after the last step is scored once more.
        sched: the `Schedule`.
        bar: a tqdm bar to advance per step (optional).
        sync: called with ``params`` after each backward pass (data parallelism: sums the
            gradients over the ranks).

    Returns:
        ``{"start", "best", "steps", "best_step", "stopped_on_time", "final_lr"}``.
    """
    t0 = time.perf_counter()
    scale = [float(p.detach().abs().mean() + 1e-12) for p in params]

    def make_opt(rate: float) -> torch.optim.Adam:
        opt = torch.optim.Adam([{"params": [p], "lr": rate * s} for p, s in zip(params, scale, strict=True)])
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        return opt

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    rate = sched.lr
    opt = make_opt(rate)
    if score is None:
        best, start, best_state = float("inf"), None, None
    else:
        best = start = score()
        best_state = snapshot()
    best_step, done, timed_out, bad, backoffs, since = 0, 0, False, 0, 0, 0
    for step in range(sched.steps):
        if sched.max_seconds is not None and time.perf_counter() - t0 > sched.max_seconds:
            timed_out = True
            break
        since += 1
        if sched.warmup:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * min(1.0, since / sched.warmup)
        opt.zero_grad(set_to_none=True)
        value = loss(step)
        if score is None:  # the objective scores the state before this step
            v = float(value.detach())
            if start is None:
                start = v
            if v < best:
                best, best_step, best_state = v, step, snapshot()
        if value.requires_grad:  # a loss may backpropagate itself in pieces and return the sum detached
            value.backward()
        if sync is not None:
            sync(params)
        opt.step()
        done = step + 1
        if bar is not None:
            bar.update(1)
        if score is None or (done % sched.every and done != sched.steps):
            continue
        e = score()
        if e < best:
            best, best_step, bad = e, done, 0
            best_state = snapshot()
        else:
            bad += 1
        if bar is not None:
            bar.set_postfix(held=f"{best:.3g}", lr=f"{rate:.1e}")
        if sched.patience is not None and bad >= sched.patience:  # back to the best, smaller steps
            if backoffs == sched.max_backoffs:
                break
            with torch.no_grad():
                for p, v in zip(params, best_state, strict=True):
                    p.copy_(v)
            rate, bad, backoffs, since = rate / 3, 0, backoffs + 1, 0
            opt = make_opt(rate)
    if score is None and done:  # the state after the last step
        with torch.no_grad():
            v = float(loss(done).detach())
        if v < best:
            best, best_step, best_state = v, done, snapshot()
    if best_state is not None:
        with torch.no_grad():
            for p, v in zip(params, best_state, strict=True):
                p.copy_(v)
    return {"start": start, "best": best, "steps": done, "best_step": best_step,
            "stopped_on_time": timed_out, "final_lr": rate, "seconds": time.perf_counter() - t0}
