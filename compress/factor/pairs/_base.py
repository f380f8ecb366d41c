"""Pairs of layers and the rules that find them in a model (`PAIRINGS`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from mixrank.core import Registry


@dataclass(frozen=True)
class Pair:
    """Layers that share an inner dimension. ``kind`` is ``"qk"`` (``first`` = query,
    ``second`` = key), ``"vo"`` (value, output) or ``"mlp"`` (fc1, fc2); ``heads`` and
    ``head_dim`` split the shared dimension of attention pairs."""

    kind: str
    first: str
    second: str
    heads: int = 1
    head_dim: int = 0

    @property
    def layers(self) -> tuple[str, str]:
        return self.first, self.second


class Pairing:
    """Interface: find the pairs of one architecture family in a model.

    ``find(model)`` returns every `Pair` whose layers it recognises (the caller keeps
    those whose two layers are both selected)."""

    name: str = ""

    def find(self, model: nn.Module) -> list[Pair]:
        raise NotImplementedError


PAIRINGS: Registry[Pairing] = Registry("pairing rule")


def is_linear(mod, attr: str) -> bool:
    """``mod.<attr>`` is an ``nn.Linear``."""
    return isinstance(getattr(mod, attr, None), nn.Linear)


def find_pairs(model: nn.Module, eligible: list[str]) -> list[Pair]:
    """Every pair any rule finds whose two layers are both in ``eligible``, each layer in
    one pair at most (the first rule that claims it), in module order."""
    order = {n: i for i, n in enumerate(eligible)}
    taken: set[str] = set()
    out = []
    for rule in PAIRINGS:
        for p in PAIRINGS[rule].find(model):
            if all(n in order and n not in taken for n in p.layers):
                out.append(p)
                taken.update(p.layers)
    return sorted(out, key=lambda p: order[p.first])


# ------------------------------------------------------------------ spectra
