"""How much work each stage may do.

Every bound counts work (evaluations, steps, multiply-adds), never seconds, so the same
inputs give the same factors on any machine under any load; `Deadline` adds the
wall-clock cap a user asks for, and records the stages it stopped.
"""

from __future__ import annotations

import math
import time


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
        """Record that ``stage`` stopped on the cap (when ``stopped``)."""
        if stopped and stage not in self.hit:
            self.hit.append(stage)

    def record(self) -> dict:
        """What the plan records (``limits``): the cap and the stages it stopped."""
        return {"max_seconds": self.seconds, "stopped_on_time": list(self.hit)}


def scored_samples(samples: int, work: int | None, tokens_per_sample: float, params: int) -> int:
    """How many held-out samples score a candidate allocation: at most ``samples``, and
    with ``work`` at most about that many multiply-adds (a sample's tokens × the selected
    layers' ``params``) per candidate."""
    if work is None:
        return samples
    per_sample = max(tokens_per_sample, 1) * params
    return min(samples, max(1, math.ceil(work / per_sample)))


def distill_steps(steps: int, work: int | None, tokens_per_sample: float, samples: int, batches: int,
                  params: int) -> int:
    """``steps``, cut so that no more than ``work`` multiply-adds (a step's tokens × the
    selected layers' ``params``, per step; a step takes one of ``batches`` batches holding
    ``samples`` samples in all) go into distillation (``None``: no cut)."""
    if work is None or not batches:
        return steps
    per_step = tokens_per_sample * samples / batches * params
    return max(1, min(steps, int(work // max(per_step, 1.0))))
