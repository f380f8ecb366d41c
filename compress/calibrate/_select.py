"""Which Linear layers of a model to compress."""

from __future__ import annotations

import fnmatch

import torch.nn as nn

from mixrank.core import MixrankError, close_matches

# Excluded when the user gives no include/exclude: heads and patch embeddings.
DEFAULT_EXCLUDE = (
    "head", "head.*", "*.head", "*.head.*", "*classifier*", "*patch_embed*", "lm_head", "*pooler*",
)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def countable_params(model: nn.Module) -> int:
    """The parameters a budget fraction (``"0.12x"``) is of: every parameter but those of
    lookup tables (``nn.Embedding``), which are gathered, not multiplied, and which no
    method compresses (a text model's token embeddings are half of MiniLM)."""
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookup)


def _block_containers(model: nn.Module) -> list[str]:
    """Qualified names of repeated-block containers (ModuleList/Sequential of >= 2
    children that hold Linear layers), e.g. timm's ``blocks`` or Swin's ``layers``."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2:
            holding = sum(any(isinstance(x, nn.Linear) for x in c.modules()) for c in mod)
            if holding >= 2:
                found.append(name)
    return found


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Qualified names of the Linear layers to compress, in module order.

    Args:
        model: any module.
        include: glob patterns over qualified names; ``None`` takes every Linear
            inside the model's repeated blocks (``blocks.*`` for timm ViTs).
        exclude: glob patterns to drop; ``None`` drops heads and patch embeddings
            unless ``include`` was given.

    Raises:
        MixrankError: a pattern matches no Linear layer, or nothing is selected.
    """
    linears = linear_layers(model)
    if not linears:
        raise MixrankError(f"{type(model).__name__} has no nn.Linear layer to compress")
    for pats, what in ((include, "include"), (exclude, "exclude")):
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(n, p) for n in linears):
                raise MixrankError(
                    f"{what} pattern {p!r} matches no Linear layer{close_matches(p, linears)}"
                )
    if include is None:
        containers = _block_containers(model)
        names = [n for n in linears if any(n.startswith(c + ".") for c in containers)]
        if exclude is None:
            names = [n for n in names if not _matches(n, DEFAULT_EXCLUDE)]
    else:
        names = [n for n in linears if _matches(n, include)]
    if exclude:
        names = [n for n in names if not _matches(n, exclude)]
    if not names:
        raise MixrankError(
            f"no Linear layer selected in {type(model).__name__}; its Linear layers are "
            f"{', '.join(list(linears)[:8])}{' ...' if len(linears) > 8 else ''}; "
            "pass include=[...] glob patterns"
        )
    return names


def block_sequence(model: nn.Module, layers: list[str]) -> tuple[str, list[list[str]]] | None:
    """The repeated-block container holding the selected layers and, per block, its
    selected layers; ``None`` when the layers are not all in one such container."""
    for cname in _block_containers(model):
        cont = model.get_submodule(cname)
        groups = []
        for i in range(len(cont)):
            prefix = f"{cname}.{i}." if cname else f"{i}."
            groups.append([n for n in layers if n.startswith(prefix)])
        if sum(len(g) for g in groups) == len(layers):
            return cname, groups
    return None
