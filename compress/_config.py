"""`CompressConfig`: what to compress, to which budget, and how."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ._errors import MixrankError

FORMAT_VERSION = 1

METHODS = ("mixrank", "whiten", "svd", "asvd", "oats")
SPARSE = ("none", "channel", "row")
METRICS = ("auto", "kl", "mse", "cosine")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
OVERRIDE_KEYS = ("dense", "rank", "min_rank", "sparse_k")


@dataclass
class CompressConfig:
    """How to compress a model.

    The budget is one of ``keep`` (fraction of the selected layers' weight
    parameters kept; ``keep=0.4`` removes 60 %), ``params`` (absolute number of
    weight parameters the selected layers may use after compression) or
    ``bytes`` (storage of the selected layers' weights at ``dtype``). With none of
    them, ``keep=0.5``.

    Attributes:
        method: ``"mixrank"`` (activation-aware low-rank, ranks allocated per layer
            by end-to-end measurement), ``"whiten"`` (activation-aware low-rank at a
            uniform parameter fraction, SVD-LLM-like) or ``"svd"`` (plain truncated
            SVD of the weight at a uniform parameter fraction).
        include: glob patterns over qualified module names selecting Linear layers;
            ``None`` selects every Linear inside the model's repeated blocks.
        exclude: glob patterns removed from the selection; ``None`` excludes the
            classifier head and patch embedding when ``include`` is ``None``.
        overrides: per-layer settings by qualified name, each a dict with one or
            more of ``dense`` (bool), ``rank`` (int, fixed) and ``min_rank`` (int).
        rank_step: ranks move in multiples of this (8 suits tensor cores).
        min_rank: rank floor of every compressed layer.
        damping: ``λ = damping · mean(diag G)`` added to the Gram matrix.
        holdout: fraction of the calibration batches held out to score
            allocations end to end (never used for statistics).
        metric: end-to-end output error that scores allocations, picks refinements
            and drives distillation: ``"kl"`` (logits), ``"mse"`` (normalised),
            ``"cosine"`` (1 − cosine) or ``"auto"`` (normalised MSE, for classifier
            logits too: on the digits ViT at keep 0.4, a search scored by logits KL
            cut the held-out KL 3x yet raised the test-split KL, 6.5e-6 -> 7.0e-6,
            because a handful of ambiguous samples dominate KL; scored by logits MSE
            the test-split KL fell to 3.5e-6).
        sparse: structure of the sparse term of ``mixrank``: ``"channel"`` (whole
            input columns), ``"row"`` (k entries per output row) or ``"none"`` (the
            default: in `benchmarks/quality.py`, 2026-11-28, with every other default
            on, channel-sparse was never better than pure low rank at equal
            parameters: identical on the digits ViTs, where the per-layer split gives
            the sparse term nothing, and worse on deit_tiny at keep 0.4, KL 1.575e-3
            vs 1.529e-3).
        sparse_splits: per layer, up to this many rank steps of its allocated
            budget may be given to the sparse term instead; the split with the lowest
            layer error wins (0 disables the sparse term).
        alternate: rounds of alternating refits (``AB`` to ``W − S``, ``S`` to
            ``W − AB``); a round is kept only if it lowers the layer error.
        compensate_steps: Adam steps refining ``A``, ``B`` and the sparse values on
            the layer's output loss (0 disables).
        compensate_lr: Adam learning rate, relative to each tensor's mean magnitude.
        sequential: also refit block by block on the compressed model's own
            activations (later layers compensate earlier errors); kept only if it
            lowers the held-out output error.
        block_steps: Adam steps of block reconstruction in the sequential refit
            (all factors of a block optimised jointly on the block's output; 0: off).
            Each block keeps its best iterate on a quarter of the batches held out; like
            every refinement it ships only when it beats the closed form on the held-out
            calibration data. On the wider digits ViT at keep 0.4, 300 steps instead of
            100 lowered the test-split KL from 8.6e-7 to 7.1e-7.
        block_lr: its learning rate, relative to each tensor's mean magnitude.
        block_seconds: wall-clock bound of all block reconstructions together
            (``None``: no limit).
        distill_steps: Adam steps of end-to-end distillation, the last refinement: all
            factors move jointly so that the compressed model's output matches the
            original's on the statistics batches (in ``metric``); the held-out
            batches pick the iterate kept, and the step size is cut to a third (back
            at the best iterate) whenever they stop improving (0: off).
        distill_lr: its starting learning rate, relative to each tensor's mean magnitude.
        distill_seconds: wall-clock bound of the distillation (``None``: no limit).
        search_rounds: maximum rounds of the allocation search.
        search_evals: maximum number of whole-model evaluations in the search.
        search_seconds: wall-clock limit of the search (``None``: no limit); the
            plan records whether the search stopped on it.
        search_samples: at most this many held-out samples are used to score an
            allocation (one whole-model forward pass over them per candidate).
        token_mask: key of a dict batch holding a (batch, tokens) mask of the
            tokens to count (for example ``"attention_mask"``); ``None`` counts all.
        device: torch device for statistics and factorization (``None``: the
            model's device).
        seed: seed for anything random.
    """

    method: str = "mixrank"
    keep: float | None = None
    params: int | None = None
    bytes: int | None = None
    dtype: str = "float32"
    include: list[str] | None = None
    exclude: list[str] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_step: int = 8
    min_rank: int = 8
    damping: float = 1e-2
    holdout: float = 0.5
    metric: str = "auto"
    sparse: str = "none"
    sparse_splits: int = 3
    alternate: int = 2
    compensate_steps: int = 200
    compensate_lr: float = 1e-3
    sequential: bool = True
    block_steps: int = 300
    block_lr: float = 1e-3
    block_seconds: float | None = 300.0
    distill_steps: int = 300
    distill_lr: float = 1e-3
    distill_seconds: float | None = 300.0
    search_rounds: int = 6
    search_evals: int = 200
    search_seconds: float | None = 300.0
    search_samples: int = 128
    token_mask: str | None = None
    device: str | None = None
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MixrankError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        given = [k for k in ("keep", "params", "bytes") if getattr(self, k) is not None]
        if len(given) > 1:
            raise MixrankError(f"give one budget, not {' and '.join(given)}")
        if not given:
            self.keep = 0.5
        if self.keep is not None and not (0.0 < float(self.keep) < 1.0 and math.isfinite(self.keep)):
            raise MixrankError(f"keep must be a fraction in (0, 1), got {self.keep}")
        if self.params is not None and int(self.params) <= 0:
            raise MixrankError(f"params must be a positive parameter count, got {self.params}")
        if self.bytes is not None and int(self.bytes) <= 0:
            raise MixrankError(f"bytes must be a positive byte count, got {self.bytes}")
        if self.dtype not in DTYPE_BYTES:
            raise MixrankError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        for name in ("search_seconds", "block_seconds", "distill_seconds"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise MixrankError(f"{name} must be > 0 or None, got {v}")
        if self.sparse not in SPARSE:
            raise MixrankError(f"unknown sparse structure {self.sparse!r}; choose one of {', '.join(SPARSE)}")
        if self.sparse == "none" and any(ov.get("sparse_k") for ov in self.overrides.values()):
            raise MixrankError("a sparse_k override needs sparse='channel' or sparse='row'")
        for name in ("sparse_splits", "alternate", "compensate_steps", "block_steps",
                     "distill_steps"):
            if int(getattr(self, name)) < 0:
                raise MixrankError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("compensate_lr", "block_lr", "distill_lr"):
            v = float(getattr(self, name))
            if not (v > 0 and math.isfinite(v)):
                raise MixrankError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("rank_step", "min_rank", "search_evals", "search_samples"):
            if int(getattr(self, name)) < 1:
                raise MixrankError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.search_rounds) < 0:
            raise MixrankError(f"search_rounds must be >= 0, got {self.search_rounds}")
        if not (0.0 <= float(self.damping) and math.isfinite(self.damping)):
            raise MixrankError(f"damping must be >= 0, got {self.damping}")
        if not 0.0 < float(self.holdout) < 1.0:
            raise MixrankError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.metric not in METRICS:
            raise MixrankError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        for pats in (self.include, self.exclude):
            if pats is not None and (isinstance(pats, str) or not all(isinstance(p, str) for p in pats)):
                raise MixrankError("include/exclude must be lists of glob patterns")
        for name, ov in self.overrides.items():
            if not isinstance(ov, dict) or not ov:
                raise MixrankError(f"override for {name!r} must be a non-empty dict of {OVERRIDE_KEYS}")
            bad = set(ov) - set(OVERRIDE_KEYS)
            if bad:
                raise MixrankError(
                    f"override for {name!r} has unknown key(s) {sorted(bad)}; allowed: {OVERRIDE_KEYS}"
                )
            if "sparse_k" in ov and (not isinstance(ov["sparse_k"], int) or ov["sparse_k"] < 0):
                raise MixrankError(f"override {name!r}: sparse_k must be an int >= 0, got {ov['sparse_k']!r}")
            for key in ("rank", "min_rank"):
                if key in ov and (not isinstance(ov[key], int) or ov[key] < 1):
                    raise MixrankError(f"override {name!r}: {key} must be a positive int, got {ov[key]!r}")

    def budget_params(self, total_params: int) -> int:
        """The parameter budget of the selected layers, given their dense total."""
        if self.keep is not None:
            return int(math.floor(self.keep * total_params))
        if self.params is not None:
            return int(self.params)
        return int(self.bytes) // DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - known
        if bad:
            raise MixrankError(f"unknown config key(s) {sorted(bad)}")
        return cls(**d)
