"""Pairs of timm models: the MLP of every block."""

from __future__ import annotations

import torch.nn as nn

from ._base import PAIRINGS, Pair, Pairing, is_linear


@PAIRINGS.register("timm-mlp")
class TimmMlpPairing(Pairing):
    """timm's ``Mlp`` (``fc1`` → element-wise activation → ``fc2``, no norm in between).
    timm's attention computes q, k and v in one fused Linear (``qkv``), which these forms
    do not split: its layers stay low rank."""

    def find(self, model):
        pairs = []
        for name, mod in model.named_modules():
            if type(mod).__name__ != "Mlp" or not (is_linear(mod, "fc1") and is_linear(mod, "fc2")):
                continue
            if not isinstance(getattr(mod, "norm", nn.Identity()), nn.Identity):
                continue
            if mod.fc1.out_features == mod.fc2.in_features:
                pre = f"{name}." if name else ""
                pairs.append(Pair("mlp", f"{pre}fc1", f"{pre}fc2"))
        return pairs
