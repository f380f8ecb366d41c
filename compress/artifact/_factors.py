"""The factors file: safetensors tensors plus the JSON plan in the metadata.

The format version (`FORMAT_VERSION`) belongs to this file format, not to a
configuration; docs/design.md, "The factors file", lists every key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixrank.core import MixrankError, atomic_write, loads_json

from ._plan import FORMAT_VERSION, READABLE_VERSIONS, LayerPlan, Plan
from ._validate import validate_factors

PLAN_KEY = "mixrank.plan"
DIGEST_KEY = "mixrank.digest"

__all__ = ["DIGEST_KEY", "FORMAT_VERSION", "PLAN_KEY", "READABLE_VERSIONS", "Factors", "check_pinned_digest",
           "load_factors", "pinned_digest", "save_factors", "weight_fingerprint"]


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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


# Significant digits the file records of a measured figure. The same inputs give the same
# tensors on any thread count, but not the same last digits of a sum: a float64 layer error
# differs from 1 to 2 threads in its 15th digit, a float32 model-output score in its 8th.
# Rounded well above that noise, the file is byte-identical across thread counts (the
# chance that a figure straddles a rounding edge is about the noise over the last digit
# kept: ~1e-7 for an NMSE, ~1e-3 for a score).
NMSE_DIGITS = 8
SCORE_DIGITS = 5


def _round(x, digits: int):
    return float(f"{x:.{digits}g}") if isinstance(x, float) else x


def recorded_figures(plan: dict) -> dict:
    """The plan as the file records it: every measured figure (a layer's ``nmse`` and
    ``nmse_closed_form``, every float of the allocation's record: scores of candidates,
    variants and the chosen plan) rounded to `NMSE_DIGITS` and `SCORE_DIGITS` significant
    digits. What the user gave (the configuration, the budget) is kept exactly."""

    def deep(o, digits):
        if isinstance(o, dict):
            return {k: deep(v, digits) for k, v in o.items()}
        if isinstance(o, list):
            return [deep(v, digits) for v in o]
        return _round(o, digits)

    out = dict(plan)
    if isinstance(out.get("allocation"), dict):
        out["allocation"] = deep(out["allocation"], SCORE_DIGITS)
    if isinstance(out.get("layers"), dict):
        out["layers"] = {n: ({k: _round(v, NMSE_DIGITS) if k.startswith("nmse") else v for k, v in i.items()}
                             if isinstance(i, dict) else i) for n, i in out["layers"].items()}
    return out


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
    plan_json = json.dumps(recorded_figures(json.loads(json.dumps(factors.plan))), sort_keys=True,
                           separators=(",", ":"))
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


def pinned_digest(value: str) -> str:
    """The SHA-256 a user pins (``--require-digest``): 64 hex digits, or a detached
    ``.sha256`` file in ``sha256sum``'s format (its first word is the digest).

    Raises:
        MixrankError: neither 64 hex digits nor a readable file holding them.
    """
    text = str(value).strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        p = Path(text)
        if not p.is_file():
            raise MixrankError(f"--require-digest takes a SHA-256 (64 hex digits) or a .sha256 file, got {value!r}")
        try:
            words = p.read_bytes()[:4096].decode("ascii").split()
        except (OSError, UnicodeDecodeError) as e:
            raise MixrankError(f"cannot read the digest file {p}: {getattr(e, 'strerror', None) or e}") from None
        if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
            raise MixrankError(f"{p} does not start with a SHA-256 (64 hex digits, as sha256sum writes it)")
        text = words[0]
    return text.lower()


def check_pinned_digest(path: str | os.PathLike, digest: str, data: bytes | None = None) -> None:
    """Refuse the file at ``path`` unless its SHA-256 is ``digest`` (see `pinned_digest`).

    The digest inside a factors file detects damage, not forgery: anyone can recompute
    it. A digest pinned from outside the file (a CI pipeline's, say) detects both.

    Raises:
        MixrankError: the file's SHA-256 is another one.
    """
    from mixrank.core import sha256_file

    want = pinned_digest(digest)
    got = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()  # data: the bytes read
    if got != want:
        raise MixrankError(f"{path} is not the pinned file: its SHA-256 is {got}, --require-digest says {want}")


def load_factors(path: str | os.PathLike, *, require_digest: str | None = None) -> Factors:
    """Read a factors file (no pickle: safetensors only) and check its integrity; plans
    of older formats are upgraded (`Plan.read`). ``require_digest``: the file's SHA-256
    must be this one (`check_pinned_digest`), checked on the bytes that are then read.

    Raises:
        MixrankError: missing, not a factors file, unsupported version, tampered (the
            digest over plan and tensors disagrees), or not what its plan says
            (`validate_factors`: one line naming the layer and the field).
    """
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not path.is_file():
        raise MixrankError(f"factors file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MixrankError(f"cannot read {path}: {e.strerror or e}") from None
    if require_digest is not None:
        check_pinned_digest(path, require_digest, data)
    try:
        n = int.from_bytes(data[:8], "little")
        tensors = load_bytes(data)
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise MixrankError(f"{path} is not a readable safetensors file ({e})") from None
    if PLAN_KEY not in meta or DIGEST_KEY not in meta:
        raise MixrankError(f"{path} is a safetensors file but not a mixrank factors file (no plan)")
    if _digest(meta[PLAN_KEY], tensors) != meta[DIGEST_KEY]:
        raise MixrankError(
            f"{path} has been modified since mixrank wrote it (digest mismatch); recompress the model"
        )
    try:
        raw = loads_json(meta[PLAN_KEY], f"{path}: its plan")
    except json.JSONDecodeError as e:
        raise MixrankError(f"{path}: its plan is not JSON ({e})") from None
    factors = Factors(tensors=tensors, plan=Plan.read(raw, where=str(path)))
    validate_factors(factors, str(path))
    return factors
