"""The factors file: safetensors tensors plus a JSON plan in the metadata."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._config import FORMAT_VERSION
from ._errors import MixrankError

PLAN_KEY = "mixrank.plan"
DIGEST_KEY = "mixrank.digest"


def weight_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a weight's float32 bytes, in its (out, in) row-major layout."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


@dataclass
class Factors:
    """Factors of the compressed layers and the plan that describes them.

    Attributes:
        tensors: ``"<layer>.A"`` (m, r) and ``"<layer>.B"`` (r, n), float32.
        plan: JSON-serialisable dict: ``format_version``, ``source``, ``budget``,
            ``calibration``, ``config``, ``layers`` (per layer: shape, rank, sparse,
            nmse, params_before/after, sha256, dense), ``allocation`` (candidates
            tried with their measured output error), ``totals``.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.plan.get("layers", {})

    def factored_layers(self) -> list[str]:
        return [n for n, info in self.layers.items() if not info.get("dense")]

    def summary(self) -> str:
        t = self.plan.get("totals", {})
        return (
            f"{len(self.factored_layers())}/{len(self.layers)} layers factored, "
            f"selected params {t.get('params_before', 0):,} -> {t.get('params_after', 0):,} "
            f"({t.get('params_after', 0) / max(t.get('params_before', 1), 1):.3f}), "
            f"model params {t.get('model_params_before', 0):,} -> "
            f"{t.get('model_params_after', 0):,}"
        )


def _digest(plan_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(plan_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_factors(factors: Factors, path: str | os.PathLike) -> Path:
    """Write ``factors`` to a safetensors file atomically (temporary name, then rename).

    Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and path.is_dir():
        raise MixrankError(f"{path} is a directory; give a file path such as model.mixrank.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in factors.tensors.items()}
    plan = dict(factors.plan)
    plan.setdefault("format_version", FORMAT_VERSION)
    plan_json = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    meta = {PLAN_KEY: plan_json, DIGEST_KEY: _digest(plan_json, tensors)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_factors(path: str | os.PathLike) -> Factors:
    """Read a factors file (no pickle: safetensors only) and check its integrity.

    Raises:
        MixrankError: missing, not a factors file, unsupported version, or tampered
            (the digest over plan and tensors disagrees).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MixrankError(f"factors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise MixrankError(f"{path} is not a readable safetensors file ({e})") from None
    if PLAN_KEY not in meta or DIGEST_KEY not in meta:
        raise MixrankError(f"{path} is a safetensors file but not a mixrank factors file (no plan)")
    if _digest(meta[PLAN_KEY], tensors) != meta[DIGEST_KEY]:
        raise MixrankError(
            f"{path} has been modified since mixrank wrote it (digest mismatch); recompress the model"
        )
    plan = json.loads(meta[PLAN_KEY])
    version = plan.get("format_version")
    if version != FORMAT_VERSION:
        raise MixrankError(
            f"{path} has factors format version {version}; this mixrank reads version "
            f"{FORMAT_VERSION}"
        )
    return Factors(tensors=tensors, plan=plan)
