"""Streaming calibration statistics: per-layer Gram matrices of Linear inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._batches import Batch, batch_size, move_batch, run_model
from ._errors import MixrankError


@dataclass
class LayerStats:
    """Input statistics of one Linear layer.

    Attributes:
        gram: ``G = Σ x xᵀ`` over every counted token, float64, (n, n).
        tokens: number of token vectors summed into ``gram``.
        abs_sum: per-channel sum of absolute inputs (for ASVD's scaling).
    """

    gram: torch.Tensor
    tokens: int = 0
    abs_sum: torch.Tensor | None = None  # Σ |x| per input channel, float64, (n,)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class Calibration:
    """Statistics of a calibration pass: one `LayerStats` per layer, and counts."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0


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
) -> Calibration:
    """Run ``batches`` through ``model`` and accumulate each layer's input Gram matrix.

    Nothing but the (n, n) float64 sums is kept: activations are folded in batch by
    batch by forward pre-hooks and dropped.

    Args:
        model: the model (evaluated in ``eval()`` mode under ``no_grad``).
        layers: qualified names of ``nn.Linear`` modules.
        batches: tensors, tuples of tensors (positional args) or dicts (kwargs).
        token_mask: key of a (batch, tokens) mask in dict batches; masked-out
            tokens (padding) are not counted.
        device: where to run; ``None`` keeps the model where it is.

    Raises:
        MixrankError: no batch, a non-finite input (names the layer), or a layer
            whose forward never ran.
    """
    modules = dict(model.named_modules())
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    calib = Calibration()
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str, n_in: int):
        def hook(_mod, args):
            x = args[0]
            if not torch.isfinite(x).all():
                raise MixrankError(
                    f"layer {name!r} received NaN or Inf inputs in calibration batch "
                    f"{calib.batches}; check the calibration data and the model's weights"
                )
            mask = current_mask[0]
            if mask is not None and x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]  # (kept tokens, n)
            x = x.reshape(-1, n_in).to(torch.float64)
            st = calib.layers.get(name)
            if st is None:
                st = calib.layers[name] = LayerStats(
                    torch.zeros(n_in, n_in, dtype=torch.float64, device=x.device),
                    abs_sum=torch.zeros(n_in, dtype=torch.float64, device=x.device),
                )
            st.gram.addmm_(x.T, x)
            st.abs_sum.add_(x.abs().sum(0))
            st.tokens += x.shape[0]

        return hook

    handles = []
    for name in layers:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise MixrankError(f"{name!r} is not an nn.Linear of {type(model).__name__}")
        handles.append(mod.register_forward_pre_hook(make_hook(name, mod.in_features)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
                current_mask[0] = _token_mask(batch, token_mask)
                run_model(model, move_batch(batch, dev))
                calib.batches += 1
                calib.samples += batch_size(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if calib.batches == 0:
        raise MixrankError("the calibration data is empty: give at least one batch")
    silent = [n for n in layers if n not in calib.layers or calib.layers[n].tokens == 0]
    if silent:
        raise MixrankError(
            f"layer(s) {', '.join(silent[:5])} received no input during calibration: their "
            "forward() is never called (a fused op may read .weight directly) or every token "
            "was masked; exclude them"
        )
    return calib
