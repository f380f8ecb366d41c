"""Streaming calibration statistics: per-layer Gram matrices of Linear inputs."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mixrank.core import MixrankError

from . import distributed as _dist
from ._batches import Batch, batch_size, move_batch, run_model


class LayerStats:
    """Input statistics of one Linear layer.

    Attributes:
        gram: ``G = Σ x xᵀ`` over every counted token, float64, (n, n). A spilled Gram
            lives in a memory-mapped file, and every read of ``gram`` is a fresh copy
            in memory that is freed when the reader drops it.
        tokens: number of token vectors summed into ``gram``.
        abs_sum: per-channel sum of absolute inputs (for ASVD's scaling).
        sum: per-channel sum of the inputs (their mean, for the bias terms of pairwise
            structures).
    """

    def __init__(self, gram: torch.Tensor | None = None, tokens: int = 0, abs_sum: torch.Tensor | None = None,
                 *, spill: np.memmap | None = None, sum: torch.Tensor | None = None):
        self._gram, self._spill = gram, spill
        self.tokens = tokens
        self.abs_sum = abs_sum  # Σ |x| per input channel, float64, (n,)
        self.sum = torch.zeros_like(abs_sum) if sum is None and abs_sum is not None else sum  # Σ x, (n,)

    @classmethod
    def zeros(cls, n: int, device, spill_to: str | None = None) -> LayerStats:
        abs_sum = torch.zeros(n, dtype=torch.float64, device=device)
        if spill_to is None:
            return cls(torch.zeros(n, n, dtype=torch.float64, device=device), abs_sum=abs_sum)
        fd = os.open(spill_to, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:  # the blocks exist before they are mapped: a full disk is an error here, not a SIGBUS later
            os.posix_fallocate(fd, 0, gram_bytes(n))
        except OSError as e:
            raise MixrankError(f"cannot spill a {n}x{n} Gram matrix to {os.path.dirname(spill_to)}: "
                               f"{e.strerror or e}; free disk space, set MIXRANK_SPILL_DIR or raise "
                               "--max-memory") from None
        finally:
            os.close(fd)
        return cls(abs_sum=abs_sum, spill=np.memmap(spill_to, dtype=np.float64, mode="r+", shape=(n, n)))

    @property
    def spilled(self) -> bool:
        return self._spill is not None

    @property
    def gram(self) -> torch.Tensor:
        if self._spill is None:
            return self._gram
        out = torch.from_numpy(np.array(self._spill))
        self._release()
        return out

    def add_(self, x: torch.Tensor) -> None:
        """Fold the (tokens, n) float64 inputs ``x`` in."""
        if self._spill is None:
            self._gram.addmm_(x.T, x)
        else:  # in place in the mapped file, whose pages are then given back
            torch.from_numpy(self._spill).addmm_(x.T.cpu(), x.cpu())
            self._release()
        self.abs_sum.add_(x.abs().sum(0))
        self.sum.add_(x.sum(0))
        self.tokens += x.shape[0]

    def all_reduce_(self) -> None:
        """Sum over the ranks of a ``torchrun`` launch (float64)."""
        if self._spill is None:
            _dist.all_reduce_sum_(self._gram)
        else:
            _dist.all_reduce_sum_(torch.from_numpy(self._spill))
            self._release()
        _dist.all_reduce_sum_(self.abs_sum)
        _dist.all_reduce_sum_(self.sum)
        self.tokens = _dist.all_reduce_sum_int(self.tokens)

    def _release(self) -> None:
        """Write the mapped pages back and drop them from this process's memory."""
        self._spill.flush()
        self._spill._mmap.madvise(mmap.MADV_DONTNEED)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)


class GramView(Mapping):
    """``{layer: Gram}`` read on demand (a spilled Gram is read from its file each time)."""

    def __init__(self, calib: Calibration, names: Iterable[str]):
        self.calib, self.names = calib, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.calib.layers[name].gram

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def gram_bytes(n_in: int) -> int:
    return 8 * n_in * n_in


def spill_plan(sizes: dict[str, int], max_memory: int | None) -> list[str]:
    """The layers whose Grams go to disk so that those kept in memory fit ``max_memory``
    bytes (the largest spill first; ``None``: none spills)."""
    if max_memory is None:
        return []
    total = sum(gram_bytes(n) for n in sizes.values())
    out = []
    for name in sorted(sizes, key=lambda k: -sizes[k]):
        if total <= max_memory:
            break
        out.append(name)
        total -= gram_bytes(sizes[name])
    return out


@dataclass
class Calibration:
    """Statistics of a calibration pass: one `LayerStats` per layer, and counts."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    spill_dir: str | None = None  # where spilled Grams live (removed with this object)
    spilled_bytes: int = 0

    @property
    def tokens_per_sample(self) -> float:
        """Token vectors per sample at the layer that sees most (padding excluded): what a
        forward pass costs, per sample, in the bounds counted in tokens."""
        return max((st.tokens for st in self.layers.values()), default=0) / max(self.samples, 1)


def _token_mask(batch: Batch, key: str | None) -> torch.Tensor | None:
    if key is None:
        return None
    if not isinstance(batch, Mapping) or key not in batch:
        raise MixrankError(
            f"token_mask={key!r} needs dict batches holding that key; got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
        )
    return batch[key].bool()


def collect_stats(
    model: nn.Module,
    layers: list[str],
    batches: Iterable[Batch],
    token_mask: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_memory: int | None = None,
) -> Calibration:
    """Run ``batches`` through ``model`` and accumulate each layer's input Gram matrix.

    Nothing but the (n, n) float64 sums is kept: activations are folded in batch by
    batch by forward pre-hooks and dropped.

    Args:
        model: the model (evaluated in ``eval()`` mode under ``no_grad``).
        layers: qualified names of ``nn.Linear`` modules.
        batches: tensors, tuples of tensors (positional args) or dicts (kwargs).
        token_mask: key of a (batch, tokens) mask in dict batches; masked-out
            tokens (padding) are not counted. ``None``: every token counts.
        device: where to run; ``None`` keeps the model where it is.
        progress: show a progress bar.
        max_memory: bytes the Grams may hold in memory; the largest beyond it are
            accumulated in memory-mapped files (``MIXRANK_SPILL_DIR`` or the system's
            temporary folder, removed when the statistics are dropped). ``None``: all in
            memory.

    Returns:
        The `Calibration`: one `LayerStats` per layer, and the batch and sample counts.

    Raises:
        MixrankError: no batch, a non-finite input (names the layer), or a layer
            whose forward never ran.
    """
    if device is not None:
        model.to(device)
    collector = _Collector(model, layers, max_memory)
    batches = list(batches)
    with collector.hooked():
        for i in tqdm(_dist.shard(batches), desc="calibrate", unit="batch", disable=not progress):
            collector.run(i, batches[i], token_mask)  # under torchrun each rank sums its share
    return collector.finish()


class _Collector:
    """The state of one calibration pass: the layers' input sizes, which Grams spill to
    disk, the statistics so far, and the batch being run (for the hooks)."""

    def __init__(self, model: nn.Module, layers: list[str], max_memory: int | None):
        modules = dict(model.named_modules())
        self.model, self.layers = model, layers
        self.sizes: dict[str, int] = {}
        for name in layers:
            mod = modules.get(name)
            if not isinstance(mod, nn.Linear):
                raise MixrankError(f"{name!r} is not an nn.Linear of {type(model).__name__}")
            self.sizes[name] = mod.in_features
        self.modules = {n: modules[n] for n in layers}
        self.calib = Calibration()
        self.spill = set(spill_plan(self.sizes, max_memory))
        if self.spill:
            self.calib.spill_dir = _spill_dir()
            weakref.finalize(self.calib, shutil.rmtree, self.calib.spill_dir, True)
            self.calib.spilled_bytes = sum(gram_bytes(self.sizes[n]) for n in self.spill)
        self.device = next(model.parameters()).device
        self.mask: torch.Tensor | None = None
        self.index = 0

    def stats_of(self, name: str, device) -> LayerStats:
        st = self.calib.layers.get(name)
        if st is None:
            path = os.path.join(self.calib.spill_dir, f"{len(self.calib.layers)}.f64") if name in self.spill else None
            st = self.calib.layers[name] = LayerStats.zeros(self.sizes[name], device, path)
        return st

    def _hook(self, name: str):
        n_in = self.sizes[name]

        def hook(_mod, args):
            x = args[0]
            if not torch.isfinite(x).all():
                raise MixrankError(
                    f"layer {name!r} received NaN or Inf inputs in calibration batch "
                    f"{self.index}; check the calibration data and the model's weights"
                )
            if self.mask is not None and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device)]  # (kept tokens, n)
            self.stats_of(name, x.device).add_(x.reshape(-1, n_in).to(torch.float64))

        return hook

    @contextlib.contextmanager
    def hooked(self):
        """The model in eval mode with a forward pre-hook on every layer, for the block."""
        handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in self.modules.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)

    def run(self, index: int, batch: Batch, token_mask: str | None) -> None:
        """Fold one batch into the statistics."""
        self.index, self.mask = index, _token_mask(batch, token_mask)
        run_model(self.model, move_batch(batch, self.device))
        self.calib.batches += 1
        self.calib.samples += batch_size(batch)

    def finish(self) -> Calibration:
        """The statistics summed over the ranks of a ``torchrun`` launch, checked."""
        calib = self.calib
        if _dist.active():
            for name in self.layers:  # a rank whose share never reached a layer contributes zeros
                self.stats_of(name, self.device).all_reduce_()
            calib.batches = _dist.all_reduce_sum_int(calib.batches)
            calib.samples = _dist.all_reduce_sum_int(calib.samples)
        if calib.batches == 0:
            raise MixrankError("the calibration data is empty: give at least one batch")
        silent = [n for n in self.layers if n not in calib.layers or calib.layers[n].tokens == 0]
        if silent:
            raise MixrankError(
                f"layer(s) {', '.join(silent[:5])} received no input during calibration: their "
                "forward() is never called (a fused op may read .weight directly) or every token "
                "was masked; exclude them"
            )
        return calib


def _spill_dir() -> str:
    root = os.environ.get("MIXRANK_SPILL_DIR") or None
    try:
        return tempfile.mkdtemp(prefix="mixrank-grams-", dir=root)
    except OSError as e:
        raise MixrankError(f"cannot create a folder for spilled Gram matrices in {root or tempfile.gettempdir()}: "
                           f"{e.strerror or e}; set MIXRANK_SPILL_DIR to a writable folder") from None
