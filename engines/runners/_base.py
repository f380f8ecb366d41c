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

SEQ_LEN = 128  # the sequence length a text model is timed at, unless told (--seq-len)


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: name, shape (``None`` for a dynamic dimension), numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: type

    def at_batch(self, batch: int, strict: bool = True, seq_len: int | None = None) -> tuple[int, ...]:
        """The concrete shape at ``batch``: the first dimension is the batch; any other
        dynamic dimension (a text model's sequence) takes ``seq_len``. A fixed batch is
        kept when not ``strict``.

        Raises:
            MixrankError: a fixed batch other than ``batch`` (``strict``), or a dynamic
                dimension beyond the batch without a ``seq_len``.
        """
        if batch < 1:
            raise MixrankError(f"batch size must be >= 1, got {batch}")
        rest = list(self.shape[1:])
        if any(d is None for d in rest):
            if seq_len is None:
                raise MixrankError(f"input {self.name} has dynamic dimensions {list(self.shape)} beyond the batch; "
                                   "give a sequence length")
            if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
                raise MixrankError(f"the sequence length must be a positive integer, got {seq_len!r}")
            rest = [seq_len if d is None else d for d in rest]
        if self.shape and self.shape[0] is not None and not strict:
            return (self.shape[0], *rest)
        if self.shape and self.shape[0] is not None and self.shape[0] != batch:
            raise MixrankError(f"{self.name} has a fixed batch of {self.shape[0]}; cannot run batch {batch}")
        return (batch, *rest)

    @property
    def integer(self) -> bool:
        """An integer input (token ids, masks), not a float tensor."""
        return np.issubdtype(np.dtype(self.dtype), np.integer)


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


def random_feeds(runner: Runner, batch: int, seed: int = 0, strict: bool = True,
                 seq_len: int | None = SEQ_LEN) -> dict[str, np.ndarray]:
    """Random inputs (generator seeded with ``seed``) of every input of ``runner`` at
    ``batch`` (at the engine's own fixed batch, if it has one, when not ``strict``), any
    dynamic sequence dimension at ``seq_len``: standard-normal float inputs; for integer
    inputs, all-ones masks (a name with ``mask``), zero token types (``type``), and token
    ids below 100 (inside every vocabulary; the values do not change the timing)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in runner.inputs():
        shape = s.at_batch(batch, strict, seq_len)
        if not s.integer:
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif "mask" in s.name:
            out[s.name] = np.ones(shape, s.dtype)
        elif "type" in s.name:
            out[s.name] = np.zeros(shape, s.dtype)
        else:
            out[s.name] = rng.integers(0, 100, shape).astype(s.dtype)
    return out


def check_inputs(runner: Runner, x) -> None:
    """Refuse inputs ``x`` the engine does not take: an array (the first input of
    ``runner``) of the wrong shape or type, or feeds (a dict, or a list of dicts: input
    name → array) that miss an input, name one it does not have, or have the wrong rank
    or kind of number.

    Raises:
        MixrankError: names the input, and the shape or type the engine takes.
    """
    specs = runner.inputs()
    if isinstance(x, (dict, list)):
        feeds = [x] if isinstance(x, dict) else x
        if not feeds or not all(isinstance(f, dict) for f in feeds):
            raise MixrankError("give the inputs as an array or as non-empty feeds (input name -> array)")
        names = {s.name for s in specs}
        for f in feeds:
            missing, extra = names - set(f), set(f) - names
            if missing or extra:
                raise MixrankError(f"{runner.path.name} takes the inputs {sorted(names)}; the feeds "
                                   + (f"miss {sorted(missing)}" if missing else f"also name {sorted(extra)}"))
            for s in specs:
                _check_one(runner, s, np.asarray(f[s.name]), f"the inputs {s.name}")
        return
    _check_one(runner, specs[0], np.asarray(x), "the inputs")


def _check_one(runner: Runner, spec: TensorSpec, x: np.ndarray, what: str) -> None:
    want = tuple(spec.shape[1:])
    if x.ndim != len(spec.shape) or any(w is not None and w != g for w, g in zip(want, x.shape[1:], strict=False)):
        shown = ["batch", *("?" if d is None else d for d in want)]
        raise MixrankError(f"{what} have shape {list(x.shape)}, but {runner.path.name} takes {shown}")
    if not np.issubdtype(x.dtype, np.number):
        raise MixrankError(f"{what} are {x.dtype}, not numbers")
    if spec.integer and not np.issubdtype(x.dtype, np.integer):
        raise MixrankError(f"{what} are {x.dtype}; {runner.path.name} takes integers (token ids)")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise MixrankError(f"{what} hold {bad:,} values that are NaN or infinite (of {x.size:,}); timing and "
                           "fidelity on them mean nothing")


def run_all(runner: Runner, x, batch: int) -> np.ndarray:
    """The first output of ``runner`` on every row of ``x``, in chunks of ``batch`` (a
    fixed-batch engine gets its own batch, the last chunk padded and cut). ``x``: an
    array for the first input, or a list of feeds (input name → array, each a batch of
    its own, e.g. texts padded per batch), each run in chunks of ``batch`` too."""
    check_inputs(runner, x)
    if isinstance(x, (dict, list)):
        feeds = [x] if isinstance(x, dict) else x
        dtypes = {s.name: s.dtype for s in runner.inputs()}
        outs = []
        for f in feeds:
            n = len(next(iter(f.values())))
            for i in range(0, n, batch):
                outs.append(runner.infer({k: np.asarray(v[i:i + batch]).astype(dtypes[k]) for k, v in f.items()})[0])
        return np.concatenate(outs).astype(np.float32)
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
