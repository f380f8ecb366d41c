"""The built-in demo model: a small timm ViT trained on scikit-learn's digits.

Real data that ships with scikit-learn (1,797 labelled 8×8 digits), upscaled to
32×32; trains in about a minute on two CPU cores and is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixrank.core import MixrankError, atomic_write, check_writable_path, warn


@dataclass(frozen=True)
class DigitsRecipe:
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    test_fraction: float = 0.2

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("MIXRANK_CACHE", Path.home() / ".cache" / "mixrank"))


def digits_data(recipe: DigitsRecipe = DigitsRecipe()):
    """(x_train, y_train, x_test, y_test): (N, 1, S, S) float tensors standardised
    to zero mean / unit variance, and int64 labels; a fixed seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(recipe.img_size, recipe.img_size), mode="bilinear",
                      align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * recipe.test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def digits_calibration(count: int = 512, batch: int = 64,
                       recipe: DigitsRecipe = DigitsRecipe()) -> list[torch.Tensor]:
    """The first ``count`` training digits in batches of ``batch`` (calibration data)."""
    xtr = digits_data(recipe)[0][:count]
    return [xtr[i:i + batch] for i in range(0, len(xtr), batch)]


def build_digits_vit(recipe: DigitsRecipe = DigitsRecipe()) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=recipe.img_size, patch_size=recipe.patch_size, in_chans=1, num_classes=10,
        embed_dim=recipe.embed_dim, depth=recipe.depth, num_heads=recipe.num_heads,
        mlp_ratio=recipe.mlp_ratio, global_pool="avg", class_token=False, fc_norm=False,
    )


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 pixels (zero-filled at the background value)."""
    pad = 3
    xp = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    out = torch.empty_like(x)
    s = x.shape[-1]
    offs = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=g)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = xp[i, :, dy:dy + s, dx:dx + s]
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def train_digits_vit(recipe: DigitsRecipe = DigitsRecipe(), progress: bool = True) -> nn.Module:
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    xtr, ytr, _, _ = digits_data(recipe)
    model = build_digits_vit(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(ytr) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps,
                                                pct_start=0.1)
    model.train()
    bar = tqdm(total=steps, desc="train digits ViT", unit="step", disable=not progress)
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            loss = F.cross_entropy(model(_augment(xtr[idx], g)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


def digits_vit(recipe: DigitsRecipe = DigitsRecipe(), progress: bool = True,
               cache: Path | None = None) -> nn.Module:
    """The trained digits ViT: loaded from the cache, or trained once and cached
    (written atomically as safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cache = Path(cache) if cache else cache_dir()
    path = cache / f"digits_vit_{recipe.key()}.safetensors"
    try:  # before two minutes of training, not after
        check_writable_path(path)
    except MixrankError as e:
        raise MixrankError(f"the model cache (MIXRANK_CACHE={cache}) cannot hold the trained model: {e}") from None
    model = build_digits_vit(recipe)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get("sha256")
            state = load_file(str(path))
            if recorded != _state_digest(state):
                raise ValueError("digest")
            model.load_state_dict(state)
            return model.eval()
        except Exception:  # damaged (or from before digests): retrained, with one line to say so
            warn(f"the cached digits model {path} is damaged or from an older mixrank (its digest does not "
                 "match); training it again")
            path.unlink(missing_ok=True)
    model = train_digits_vit(recipe, progress=progress)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"recipe": json.dumps(asdict(recipe)), "sha256": _state_digest(state)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return model


def _state_digest(state: dict) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
