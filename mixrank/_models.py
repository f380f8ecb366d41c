"""Model sources for the CLI: the built-in digits ViT, a timm name, or a checkpoint."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from mixrank.core import MixrankError, close_matches

from ._demo import digits_vit

DIGITS = "digits"


def load_model(name: str | None = None, pretrained: bool = False,
               checkpoint: str | os.PathLike | None = None, progress: bool = True) -> nn.Module:
    """``None``/``"digits"``: the built-in digits ViT (trained once, cached). Otherwise
    a timm model name, with timm's pretrained weights (``pretrained``) or a local
    checkpoint (``.safetensors``, or ``.pth``/``.pt`` loaded with ``weights_only=True``).

    Raises:
        MixrankError: unknown model name (close matches listed), weights that cannot be
            downloaded, a checkpoint that does not fit the architecture.
    """
    if name in (None, DIGITS):
        if pretrained or checkpoint:
            raise MixrankError("the built-in digits model takes no --pretrained/--checkpoint")
        return digits_vit(progress=progress).eval()
    import timm

    if not timm.is_model(name):
        raise MixrankError(f"unknown timm model {name!r}{close_matches(name, timm.list_models())}")
    if pretrained and checkpoint:
        raise MixrankError("give --pretrained or --checkpoint, not both")
    if pretrained and not os.environ.get("HF_HUB_OFFLINE"):
        _check_hub_reachable(name)
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as e:
        if pretrained:
            raise MixrankError(
                f"could not load timm's pretrained weights for {name} ({type(e).__name__}: "
                f"{str(e)[:200]}); the model hub may be unreachable from here: download the "
                "weights elsewhere and pass --checkpoint FILE") from None
        raise
    if checkpoint:
        model.load_state_dict(_read_checkpoint(checkpoint, model))
    return model.eval()


def _check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after a minute of retries, when the model hub cannot be reached
    (with ``HF_HUB_OFFLINE=1`` timm reads weights already in the local cache instead)."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as e:
        raise MixrankError(f"cannot reach the model hub (huggingface.co: {e.strerror or e}) for {name}'s "
                           "pretrained weights; download them elsewhere and pass --checkpoint FILE, or set "
                           "HF_HUB_OFFLINE=1 if they are in the local cache") from None


def _read_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MixrankError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            why = ("it holds Python objects besides tensors, and mixrank never runs pickled code; save "
                   "model.state_dict() (plain tensors) or a .safetensors file")
        else:
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
            why = f"{type(e).__name__}: {first[0][:200] if first else 'unreadable'}"
        raise MixrankError(f"cannot read checkpoint {path}: {why}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise MixrankError(f"checkpoint {path} does not hold a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or extra or shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", shape)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise MixrankError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    return sd
