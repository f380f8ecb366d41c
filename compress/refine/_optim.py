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
    run = _Descent(params, loss, score, sched, bar, sync)
    for step in range(sched.steps):
        if sched.max_seconds is not None and time.perf_counter() - run.t0 > sched.max_seconds:
            run.timed_out = True
            break
        run.step(step)
        if score is None or (run.done % sched.every and run.done != sched.steps):
            continue
        if not run.judge():
            break
    return run.finish()


class _Descent:
    """The state of one `descend`: Adam with a learning rate per tensor, the best iterate
    and its score, and the patience and back-offs of the schedule."""

    def __init__(self, params, loss, score, sched: Schedule, bar, sync):
        self.params, self.loss, self.score, self.sched, self.bar, self.sync = params, loss, score, sched, bar, sync
        self.t0 = time.perf_counter()
        self.scale = [float(p.detach().abs().mean() + 1e-12) for p in params]
        self.rate = sched.lr
        self.opt = self.make_opt(self.rate)
        if score is None:
            self.best, self.start, self.best_state = float("inf"), None, None
        else:
            self.best = self.start = score()
            self.best_state = self.snapshot()
        self.best_step, self.done, self.timed_out, self.bad, self.backoffs, self.since = 0, 0, False, 0, 0, 0

    def make_opt(self, rate: float) -> torch.optim.Adam:
        opt = torch.optim.Adam([{"params": [p], "lr": rate * s} for p, s in zip(self.params, self.scale, strict=True)])
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        return opt

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, state, strict=True):
                p.copy_(v)

    def step(self, step: int) -> None:
        """One Adam step on ``loss(step)`` (with warm-up); a full-batch objective scores
        the state before the step."""
        self.since += 1
        if self.sched.warmup:
            for g in self.opt.param_groups:
                g["lr"] = g["base_lr"] * min(1.0, self.since / self.sched.warmup)
        self.opt.zero_grad(set_to_none=True)
        value = self.loss(step)
        if self.score is None:  # the objective scores the state before this step
            v = float(value.detach())
            if self.start is None:
                self.start = v
            if v < self.best:
                self.best, self.best_step, self.best_state = v, step, self.snapshot()
        if value.requires_grad:  # a loss may backpropagate itself in pieces and return the sum detached
            value.backward()
        if self.sync is not None:
            self.sync(self.params)
        self.opt.step()
        self.done = step + 1
        if self.bar is not None:
            self.bar.update(1)

    def judge(self) -> bool:
        """Score the state; after ``patience`` scores without a gain, back off to the best
        iterate with a third of the step size. Returns whether to go on."""
        e = self.score()
        if e < self.best:
            self.best, self.best_step, self.bad = e, self.done, 0
            self.best_state = self.snapshot()
        else:
            self.bad += 1
        if self.bar is not None:
            self.bar.set_postfix(held=f"{self.best:.3g}", lr=f"{self.rate:.1e}")
        if self.sched.patience is not None and self.bad >= self.sched.patience:  # back to the best, smaller steps
            if self.backoffs == self.sched.max_backoffs:
                return False
            self.restore(self.best_state)
            self.rate, self.bad, self.backoffs, self.since = self.rate / 3, 0, self.backoffs + 1, 0
            self.opt = self.make_opt(self.rate)
        return True

    def finish(self) -> dict:
        """Leave the parameters at the best iterate; the record of the run."""
        if self.score is None and self.done:  # the state after the last step
            with torch.no_grad():
                v = float(self.loss(self.done).detach())
            if v < self.best:
                self.best, self.best_step, self.best_state = v, self.done, self.snapshot()
        if self.best_state is not None:
            self.restore(self.best_state)
        return {"start": self.start, "best": self.best, "steps": self.done, "best_step": self.best_step,
                "stopped_on_time": self.timed_out, "final_lr": self.rate, "seconds": time.perf_counter() - self.t0}
