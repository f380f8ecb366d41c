"""Calibration batches: tensors, tuples (positional arguments) or dicts (keyword
arguments), and the model calls and slicing that work on all three."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from mixrank.core import MixrankError

Batch = Any  # a tensor, a tuple/list of tensors (positional args), or a dict of kwargs


def move_batch(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def run_model(model: nn.Module, batch: Batch):
    """Call ``model`` on a batch: tensor → ``model(x)``, tuple → ``model(*b)``,
    dict → ``model(**b)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
    raise MixrankError("a calibration batch holds no tensor")


def slice_batch(batch: Batch, lo: int, hi: int, size: int) -> Batch:
    """Samples ``lo:hi`` of a batch of ``size`` samples (tensors whose first dimension
    is ``size`` are sliced; anything else is passed through)."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.ndim and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, lo, hi, size) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, lo, hi, size) for v in batch)
    return batch


def limit_samples(batches: list, max_samples: int | None) -> list:
    """The first ``max_samples`` samples of ``batches`` (the last batch cut short)."""
    if max_samples is None:
        return list(batches)
    out, left = [], max_samples
    for b in batches:
        if left <= 0:
            break
        n = batch_size(b)
        out.append(b if n <= left else slice_batch(b, 0, left, n))
        left -= n
    return out


def model_output(model: nn.Module, batch: Batch, token_mask: str | None = None) -> torch.Tensor:
    """The main output tensor of ``model`` on ``batch``. With ``token_mask`` (the key of a
    (batch, tokens) mask in dict batches), an output with one row per token is zeroed at
    the masked-out (padding) tokens, so no score or loss counts them."""
    return mask_tokens(first_tensor(run_model(model, batch)), batch, token_mask)


def mask_tokens(y: torch.Tensor, batch: Batch, token_mask: str | None) -> torch.Tensor:
    """``y`` zeroed at the masked-out tokens when it has one row per token of ``batch``."""
    if token_mask is not None and isinstance(batch, Mapping) and token_mask in batch:
        mask = batch[token_mask]
        if y.ndim >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
            y = y * mask.to(y.device, y.dtype).reshape(*mask.shape, *([1] * (y.ndim - 2)))
    return y


def first_tensor(out) -> torch.Tensor:
    """The main output tensor of a model call (``logits`` of a dict/ModelOutput,
    the first element of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if "logits" in out:
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise MixrankError(f"cannot find an output tensor in a {type(out).__name__}")


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
