"""A sibling's size as the budget (``--like NAME``): the seed paper's second headline, a
large model compressed to the size of its smaller sibling (deit_base ``--like
deit_small_patch16_224``).

Sizes are counted on the architecture alone, built on PyTorch's ``meta`` device (no
weights are allocated, downloaded or read): a timm name, a Hugging Face folder, or the
built-in digits model. The count leaves out lookup tables (``nn.Embedding``), like every
budget fraction (`mixrank.compress.countable_params`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mixrank.core import MixrankError, close_matches

from ._hf import architecture, hf_folder
from ._models import DIGITS


@dataclass(frozen=True)
class Size:
    """A model's size: its name, all its parameters, and those a budget counts."""

    name: str
    params: int
    countable: int

    @property
    def fp32_bytes(self) -> int:
        """Its float32 weight bytes (the countable parameters at 4 bytes)."""
        return 4 * self.countable

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "countable_params": self.countable,
                "fp32_bytes": self.fp32_bytes}


def model_size(name: str | None) -> Size:
    """The size of the model ``name`` stands for (as ``--model`` takes it).

    Raises:
        MixrankError: an unknown timm name (close matches listed), or a folder that is not
            a Hugging Face model.
    """
    from mixrank.compress import countable_params

    model = _architecture(name)
    return Size(str(name or DIGITS), sum(p.numel() for p in model.parameters()), countable_params(model))


def _architecture(name: str | None) -> nn.Module:
    if name in (None, DIGITS):
        from ._models import load_model

        return load_model(None, progress=False)
    folder = hf_folder(name)
    if folder is not None:
        return architecture(folder)
    import timm

    if not timm.is_model(name):
        raise MixrankError(f"--like {name!r}: unknown timm model{close_matches(name, timm.list_models())}")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def like_budget(sibling: str, model: str | None, unit: str) -> tuple[str, dict]:
    """The budget that gives the model ``model`` (as ``--model`` names it) the size of
    ``sibling``: a fraction (``"0.25x"``) of the model's parameters (``unit="params"``) or
    of its float32 weight bytes (``unit="bytes"``), to pass as the budget's ``params`` or
    ``bytes``; and the record the plan and report keep (the sibling's name, parameters and
    float32 bytes).

    Raises:
        MixrankError: the sibling is not smaller than the model, or either is unknown.
    """
    if unit not in ("params", "bytes"):
        raise MixrankError(f"a sibling's size is counted in params or bytes, not {unit!r}")
    size, own = model_size(sibling), model_size(model)
    if size.countable >= own.countable:
        raise MixrankError(f"--like {sibling}: it has {size.countable:,} parameters, not fewer than the model's "
                           f"{own.countable:,}; name a smaller sibling")
    frac = size.countable / own.countable
    return f"{frac:.12g}x", {**size.to_dict(), "unit": unit, "fraction": frac}
