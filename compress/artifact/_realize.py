"""What ships: every compressed layer stored at its precision, as the factors file holds
it and as the engine reads it back (`realize`)."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..factor import form_of
from ..store import store_weight


class Realized(NamedTuple):
    """The layers as stored.

    Attributes:
        tensors: the factors file's tensors by full name (``"<layer>.A"``, ...).
        fits: the factored layers' `LayerFit` as read back (float32).
        dense: the weights of layers left dense but stored below fp32, as read back.
    """

    tensors: dict[str, torch.Tensor]
    fits: dict
    dense: dict[str, torch.Tensor]


def realize(fits: dict, dense: dict[str, str], precisions: dict[str, str], quant,
            grams: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
            blocks: dict[str, int] | None = None) -> Realized:
    """Store every compressed layer at its precision.

    Args:
        fits: the factored layers' `LayerFit` (float32).
        dense: layer → precision of layers left dense but stored below fp32.
        precisions: layer → precision of the factored layers (fp32 where absent).
        quant: the `Quantize` settings.
        grams, weights: each layer's input Gram matrix and original weight.
        blocks: layer → the integer block of a dense layer (``None``, or absent:
            ``quant.block``).

    Returns:
        `Realized`.
    """
    tensors, read, read_dense = {}, {}, {}

    def keep(name: str, stored: dict[str, torch.Tensor]) -> None:
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in stored.items()})

    for name, f in fits.items():
        p = precisions.get(name, "fp32")
        stored, A, B = form_of(f.form).store(f, p, quant, grams.get(name))
        keep(name, stored)
        sp = f.sparse
        if sp is not None:  # a sparse term is stored in floating point at the factors' float width
            value = sp.value.half() if p == "fp16" else sp.value.float()
            tensors[f"{name}.sparse_index"] = sp.index.detach().cpu().to(torch.int32).contiguous()
            tensors[f"{name}.sparse_value"] = value.detach().cpu().contiguous()
            sp = replace(sp, value=value.float())
        read[name] = f if p == "fp32" else f.replace(A=A.cpu(), B=B.cpu(), sparse=sp)
    for name, p in dense.items():
        stored, W = store_weight(weights[name], p, quant, grams.get(name), block=(blocks or {}).get(name))
        keep(name, stored)
        read_dense[name] = W
    return Realized(tensors, read, read_dense)
