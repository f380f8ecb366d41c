"""The engine interface: a `Runner` loads an artifact, describes its inputs, runs
inference and closes. `measure`, fidelity and the peak-memory probe only talk to
runners, looked up in `RUNNERS` by engine name (docs/design.md, "Adding an engine")."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixrank.core import MixrankError, Registry


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: name, shape (``None`` for a dynamic dimension), numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: type

    def at_batch(self, batch: int, strict: bool = True) -> tuple[int, ...]:
        """The concrete shape at ``batch`` (only the first dimension may be dynamic; a
        fixed batch is kept when not ``strict``).

        Raises:
            MixrankError: a fixed batch other than ``batch`` (``strict``), or another
                dynamic dimension.
        """
        if batch < 1:
            raise MixrankError(f"batch size must be >= 1, got {batch}")
        if any(d is None for d in self.shape[1:]):
            raise MixrankError(f"input {self.name} has dynamic dimensions {list(self.shape)} beyond the batch")
        if self.shape and self.shape[0] is not None and not strict:
            return tuple(self.shape)
        if self.shape and self.shape[0] is not None and self.shape[0] != batch:
            raise MixrankError(f"{self.name} has a fixed batch of {self.shape[0]}; cannot run batch {batch}")
        return (batch, *self.shape[1:])


class Runner:
    """Interface of an inference engine over one artifact.

    Lifecycle: ``Runner(path, settings)`` → `load` → `inputs` / `infer` / `time` →
    `close` (also a context manager). ``settings_type`` is the settings dataclass (its
    ``to_dict`` round-trips through the peak-memory child process).
    """

    engine: str = ""
    settings_type: type | None = None

    def __init__(self, path: str | os.PathLike, settings=None):
        self.path = Path(path)
        self.settings = settings

    def load(self) -> Runner:
        """Load the artifact; returns the runner itself.

        Raises:
            MixrankError: the engine cannot load it (or is not installed).
        """
        raise NotImplementedError

    def inputs(self) -> list[TensorSpec]:
        """The artifact's inputs, in order."""
        raise NotImplementedError

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; returns the outputs as host numpy arrays."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (nothing for host engines)."""

    def time(self, feeds: dict[str, np.ndarray], iters: int) -> list[float]:
        """Seconds of each of ``iters`` runs of `infer` on ``feeds`` (wall clock;
        device engines override this with device timers)."""
        out = []
        for _ in range(iters):
            t = time.perf_counter()
            self.infer(feeds)
            out.append(time.perf_counter() - t)
        return out

    def memory(self) -> dict:
        """Engine-reported memory figures (bytes), e.g. TensorRT's device memory."""
        return {}

    def describe(self) -> dict:
        """Settings and versions for the report."""
        return {"engine": self.engine}

    def close(self) -> None:
        """Release the engine (sessions, device memory)."""

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()


RUNNERS: Registry[type[Runner]] = Registry("engine", classes=True)


def make_runner(engine: str, path: str | os.PathLike, settings=None) -> Runner:
    """A loaded runner of the registered ``engine`` for ``path`` (``settings`` may be the
    engine's settings object or its dict)."""
    cls = RUNNERS[engine]
    if not Path(path).is_file():
        raise MixrankError(f"{engine} artifact {path} does not exist")
    if isinstance(settings, dict):
        settings = cls.settings_type(**settings)
    return cls(path, settings).load()


def random_feeds(runner: Runner, batch: int, seed: int = 0, strict: bool = True) -> dict[str, np.ndarray]:
    """Standard-normal inputs (generator seeded with ``seed``) of every input of
    ``runner`` at ``batch`` (at the engine's own fixed batch, if it has one, when not
    ``strict``)."""
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.at_batch(batch, strict)).astype(s.dtype) for s in runner.inputs()}


def check_inputs(runner: Runner, x: np.ndarray) -> None:
    """Refuse inputs ``x`` whose shape or type the first input of ``runner`` does not take.

    Raises:
        MixrankError: names the shape or type and what the engine takes.
    """
    spec = runner.inputs()[0]
    x = np.asarray(x)
    want = tuple(spec.shape[1:])
    if x.ndim != len(spec.shape) or any(w is not None and w != g for w, g in zip(want, x.shape[1:], strict=False)):
        shown = ["batch", *("?" if d is None else d for d in want)]
        raise MixrankError(f"the inputs have shape {list(x.shape)}, but {runner.path.name} takes {shown}")
    if not np.issubdtype(x.dtype, np.number):
        raise MixrankError(f"the inputs are {x.dtype}, not numbers")


def run_all(runner: Runner, x: np.ndarray, batch: int) -> np.ndarray:
    """The first output of ``runner`` on every row of ``x``, in chunks of ``batch`` (a
    fixed-batch engine gets its own batch, the last chunk padded and cut)."""
    check_inputs(runner, x)
    spec = runner.inputs()[0]
    x = np.asarray(x)
    fixed = spec.shape[0] if spec.shape and spec.shape[0] is not None else None
    batch = fixed or batch
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch].astype(spec.dtype)
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), spec.dtype)])
        outs.append(runner.infer({spec.name: chunk})[0][:n])
    return np.concatenate(outs).astype(np.float32)
