"""The factors file: safetensors tensors plus the JSON plan in the metadata.

The format version (`FORMAT_VERSION`) belongs to this file format, not to a
configuration; docs/design.md, "The factors file", lists every key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixrank.core import MixrankError, atomic_write

from ._plan import FORMAT_VERSION, READABLE_VERSIONS, LayerPlan, Plan
from ._validate import validate_factors

PLAN_KEY = "mixrank.plan"
DIGEST_KEY = "mixrank.digest"

__all__ = ["DIGEST_KEY", "FORMAT_VERSION", "PLAN_KEY", "READABLE_VERSIONS", "Factors", "load_factors",
           "save_factors", "weight_fingerprint"]


def weight_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a weight's float32 bytes, in its (out, in) row-major layout."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


@dataclass
class Factors:
    """Factors of the compressed layers and the plan that describes them.

    Attributes:
        tensors: ``"<layer>.A"`` (m, r) and ``"<layer>.B"`` (r, n), float32, and for a
            sparse term ``"<layer>.sparse_index"`` (int32) and ``"<layer>.sparse_value"``.
        plan: the typed `Plan` (a dict given here is read with `Plan.read`).
        timings: seconds per stage of the compression that made them (not in the file:
            the file is the same for the same inputs on any machine).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan.empty)
    timings: dict = field(default_factory=dict)  # seconds per stage; not written to the file

    def __post_init__(self) -> None:
        if not isinstance(self.plan, Plan):
            self.plan = Plan.read(self.plan)

    @property
    def layers(self) -> dict[str, LayerPlan]:
        return self.plan.layers

    def factored_layers(self) -> list[str]:
        """The layers stored as factors (not dense), in plan order."""
        return self.plan.factored_layers()

    def summary(self) -> str:
        """One line: layers factored, and the selected and whole model's parameters."""
        t = self.plan.totals
        return (
            f"{len(self.factored_layers())}/{len(self.layers)} layers factored, "
            f"selected params {t.params_before:,} -> {t.params_after:,} "
            f"({t.params_after / max(t.params_before, 1):.3f}), "
            f"model params {t.model_params_before:,} -> {t.model_params_after:,}"
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
    """Write ``factors`` to a safetensors file atomically (`atomic_write`).

    Returns the path written.

    Raises:
        MixrankError: the path is a directory or not writable.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise MixrankError(f"{path} is a directory; give a file path such as model.mixrank.safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in factors.tensors.items()}
    plan_json = json.dumps(factors.plan, sort_keys=True, separators=(",", ":"))
    meta = {PLAN_KEY: plan_json, DIGEST_KEY: _digest(plan_json, tensors)}
    data = _canonical(save(tensors, metadata=meta))
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _canonical(data: bytes) -> bytes:
    """The same safetensors bytes with the header's metadata in sorted key order.

    safetensors keeps the metadata in a hash map, so its key order (and with it the file's
    SHA-256) changes from one process to the next; the tensors' offsets are relative to the
    end of the header, so re-serialising the header alone keeps the file valid."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    raw = json.dumps(ordered, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def load_factors(path: str | os.PathLike) -> Factors:
    """Read a factors file (no pickle: safetensors only) and check its integrity; plans
    of older formats are upgraded (`Plan.read`).

    Raises:
        MixrankError: missing, not a factors file, unsupported version, tampered (the
            digest over plan and tensors disagrees), or not what its plan says
            (`validate_factors`: one line naming the layer and the field).
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
    try:
        raw = json.loads(meta[PLAN_KEY])
    except json.JSONDecodeError as e:
        raise MixrankError(f"{path}: its plan is not JSON ({e})") from None
    factors = Factors(tensors=tensors, plan=Plan.read(raw, where=str(path)))
    validate_factors(factors, str(path))
    return factors
