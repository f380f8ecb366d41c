"""`CompressConfig`: what to compress, to which budget, and how.

A configuration has a few general settings (method, metric, damping, holdout,
token_mask, device, seed) and four sections:

- `Budget`: how much the selected layers may keep.
- `Selection`: which layers, the per-layer overrides, and the rank grid.
- `Search`: the end-to-end allocation search (method ``mixrank``).
- `Refine`: the refinements after the closed form (method ``mixrank``).

Each section validates itself. The configuration as a whole is checked against the
method: a setting that the method's components never read is an error that names it
(each component declares what it reads, `mixrank.compress._methods`). Flat keyword
arguments are accepted and routed to their section (``CompressConfig(keep=0.4,
search_evals=40)`` is ``CompressConfig(budget=Budget(keep=0.4), search=Search(evals=40))``),
and so are flat dicts (factors files of format 1). TOML files use the sections as
tables (docs/design.md, "Configuration").
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import MixrankError, close_matches

METRICS = ("auto", "kl", "mse", "cosine")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# the storage precision a legacy ``dtype`` stands for (bfloat16 is not stored by any engine here)
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "int8": "int8"}
OVERRIDE_KEYS = ("dense", "rank", "min_rank", "sparse_k")
STRUCTURES = ("auto", "lowrank", "pairs")


def _fraction(name: str, value) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MixrankError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise MixrankError(f"{name} must be a fraction in (0, 1), got {value}")


@dataclass
class Budget:
    """How much the selected layers keep: one of ``keep`` (fraction of their weight
    parameters; ``keep=0.4`` removes 60 %), ``params`` (absolute parameter count) or
    ``bytes`` (real storage of the selected layers' weights as the exporter writes them:
    values at their precision, plus scales and zero points of integer blocks, plus sparse
    indices; or ``"0.12x"``: that fraction of the whole model's float32 weight bytes,
    the layers left out of the selection counted at float32). With none of them,
    ``keep=0.5``. ``dtype`` is the older way to name the
    storage of the values (``float16`` is precision ``fp16``); `Quantize` is the new one."""

    keep: float | None = None
    params: int | None = None
    bytes: int | str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.bytes, str):
            self.bytes = self.bytes.strip()
            if not self.bytes.endswith("x"):
                raise MixrankError(f"bytes must be a byte count or a fraction of the model's float32 weight "
                                   f"bytes such as '0.12x', got {self.bytes!r}")
            _fraction("bytes (as a fraction, 'NNx')", self.bytes[:-1])
        given = [k for k in ("keep", "params", "bytes") if getattr(self, k) is not None]
        if len(given) > 1:
            raise MixrankError(f"give one budget, not {' and '.join(given)}")
        if not given:
            self.keep = 0.5
        if self.keep is not None:
            _fraction("keep", self.keep)
        for name in ("params", "bytes"):
            v = getattr(self, name)
            if isinstance(v, str):
                continue
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or int(v) <= 0):
                what = "parameter" if name == "params" else "byte"
                raise MixrankError(f"{name} must be a positive {what} count, got {v}")
        if self.dtype not in DTYPE_BYTES:
            raise MixrankError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")

    def params_for(self, total_params: int) -> int:
        """The parameter budget of the selected layers, given their dense total."""
        if self.keep is not None:
            return int(math.floor(self.keep * total_params))
        if self.params is not None:
            return int(self.params)
        return int(self.bytes) // DTYPE_BYTES[self.dtype]

    def bytes_for(self, selected_params: int, model_params: int) -> int:
        """The bytes budget of the selected layers (a fraction ``"0.12x"`` is of the whole
        model's float32 weight bytes, minus the float32 bytes of everything unselected).

        Raises:
            MixrankError: the unselected weights alone take the whole fraction.
        """
        if not isinstance(self.bytes, str):
            return int(self.bytes)
        frac = float(self.bytes[:-1])
        rest = 4 * (model_params - selected_params)
        budget = int(math.floor(frac * 4 * model_params)) - rest
        if budget <= 0:
            raise MixrankError(f"bytes {self.bytes} of the model is {frac * 4 * model_params:,.0f} bytes, but the "
                               f"layers not selected for compression already take {rest:,} bytes at float32; "
                               "raise the fraction or select more layers (include=...)")
        return budget


@dataclass
class Selection:
    """Which Linear layers, per-layer overrides, and the rank grid.

    Attributes:
        include: glob patterns over qualified module names; ``None`` selects every
            Linear inside the model's repeated blocks.
        exclude: glob patterns removed; ``None`` excludes heads and patch embeddings
            when ``include`` is ``None``.
        overrides: per-layer settings by qualified name, each a dict with one or more
            of ``dense`` (bool), ``rank`` (int, fixed), ``min_rank`` (int) and
            ``sparse_k`` (int).
        rank_step: ranks move in multiples of this (8 suits tensor cores).
        min_rank: rank floor of every compressed layer.
        structure: ``"lowrank"`` (every layer factored on its own), ``"pairs"`` (layers
            that form a pair — attention query/key, value/output, an MLP's two layers —
            shrink their shared dimension instead; `mixrank.compress._pairs`) or ``"auto"``
            (both are scored end to end, the better ships). ``None``: ``"auto"`` for a
            method that has pairwise forms (``mixrank``), else ``"lowrank"``.
    """

    include: list[str] | None = None
    exclude: list[str] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_step: int = 8
    min_rank: int = 8
    structure: str | None = None

    def __post_init__(self) -> None:
        for pats in (self.include, self.exclude):
            if pats is not None and (isinstance(pats, str) or not all(isinstance(p, str) for p in pats)):
                raise MixrankError("include/exclude must be lists of glob patterns")
        if not isinstance(self.overrides, dict):
            raise MixrankError("overrides must be a table of layer name = settings")
        for name, ov in self.overrides.items():
            if not isinstance(ov, dict) or not ov:
                raise MixrankError(f"override for {name!r} must be a non-empty dict of {OVERRIDE_KEYS}")
            bad = set(ov) - set(OVERRIDE_KEYS)
            if bad:
                raise MixrankError(
                    f"override for {name!r} has unknown key(s) {sorted(bad)}; allowed: {OVERRIDE_KEYS}")
            if "dense" in ov and not isinstance(ov["dense"], bool):
                raise MixrankError(f"override {name!r}: dense must be true or false, got {ov['dense']!r}")
            if "sparse_k" in ov and (isinstance(ov["sparse_k"], bool) or not isinstance(ov["sparse_k"], int)
                                     or ov["sparse_k"] < 0):
                raise MixrankError(f"override {name!r}: sparse_k must be an int >= 0, got {ov['sparse_k']!r}")
            for key in ("rank", "min_rank"):
                if key in ov and (isinstance(ov[key], bool) or not isinstance(ov[key], int) or ov[key] < 1):
                    raise MixrankError(f"override {name!r}: {key} must be a positive int, got {ov[key]!r}")
        for name in ("rank_step", "min_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MixrankError(f"{name} must be >= 1, got {v}")
        if self.structure not in (None, *STRUCTURES):
            raise MixrankError(f"unknown structure {self.structure!r}; choose one of {', '.join(STRUCTURES)}")


@dataclass
class Quantize:
    """How weights are stored (docs/design.md, "Precision").

    Attributes:
        precision: ``"fp32"``, ``"fp16"``, ``"int8"``, ``"int4"`` for every compressed
            layer, or ``"auto"`` (a ``bytes`` budget only): rank and precision are chosen
            per layer end to end, with dense int8 and int4 of the original weights among
            the candidates, so the result is never worse than quantization alone at the
            same bytes. ``None``: the budget's ``dtype`` (fp32 by default).
        block: integer block size along the reduction axis (onnxruntime's ``MatMulNBits``).
        quantizer: ``"gptq"`` (rounding errors fed forward through the layer's input
            Gram matrix) or ``"rtn"`` (round to nearest, what onnxruntime's quantizer does).
        split: how a factor pair is scaled before storage: ``"balanced"`` (``A = U Σ^½``,
            ``B = Σ^½ Vᵀ L⁻¹``), ``"u"`` (``A = U``) or ``"us"`` (``A = U Σ``). Float
            precisions are stored as fitted.
        scheme: ``"asymmetric"`` (a zero point per block; onnxruntime) or ``"symmetric"``
            (no zero points; what TensorRT's dequantize accepts, and onnxruntime too).
    """

    precision: str | None = None
    block: int = 32
    quantizer: str = "gptq"
    split: str = "balanced"
    scheme: str = "asymmetric"

    def __post_init__(self) -> None:
        from ._quant import BLOCKS, PRECISIONS, SPLITS

        if self.precision is not None and self.precision not in (*PRECISIONS, "auto"):
            raise MixrankError(f"unknown precision {self.precision!r}; choose one of "
                               f"{', '.join((*PRECISIONS, 'auto'))}")
        if self.block not in BLOCKS:
            raise MixrankError(f"block must be one of {', '.join(map(str, BLOCKS))} (onnxruntime's "
                               f"MatMulNBits), got {self.block!r}")
        if self.quantizer not in ("gptq", "rtn"):
            raise MixrankError(f"unknown quantizer {self.quantizer!r}; choose gptq or rtn")
        if self.split not in SPLITS:
            raise MixrankError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if self.scheme not in ("asymmetric", "symmetric"):
            raise MixrankError(f"unknown scheme {self.scheme!r}; choose asymmetric or symmetric")


@dataclass
class Search:
    """The end-to-end allocation search of method ``mixrank``.

    Attributes:
        rounds: maximum rounds (each probes every free layer one rank step down and up,
            then tries a few moves of rank between layers).
        evals: maximum number of whole-model evaluations.
        seconds: wall-clock bound (``None``: none); the plan records a stop on it.
        samples: at most this many held-out samples score an allocation (one forward
            pass over them per candidate). Every method scores its allocation on them.
        work: and at most about this many multiply-adds through the selected layers per
            candidate (held-out tokens × the selected layers' parameters; ``None``: no
            such bound): all 128 samples on the digits models and vit_small, 21 images of
            197 tokens on deit_base, so a candidate costs seconds on any model without
            thinning small models' scoring.
        groups: probe layers in groups of one role within each of this many spans of the
            depth (a round then costs ~2·roles·groups evaluations instead of 2 per layer);
            0 probes each layer alone.
        role_scales: before the rounds, each role's fraction of the budget scaled by each
            of these factors (the other roles share what is left), in two passes; the best
            start wins if it beats uniform (``()``: off). Costs up to 4·roles evaluations.
    """

    rounds: int = 6
    evals: int = 200
    seconds: float | None = None
    samples: int = 128
    work: int | None = 350_000_000_000
    groups: int = 0
    role_scales: tuple[float, ...] = (0.6, 1.6)

    def __post_init__(self) -> None:
        try:
            self.role_scales = tuple(float(v) for v in self.role_scales)
        except (TypeError, ValueError):
            raise MixrankError(f"search_role_scales must be a list of positive numbers, got "
                               f"{self.role_scales!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in self.role_scales):
            raise MixrankError(f"search_role_scales must be positive numbers, got {list(self.role_scales)}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise MixrankError(f"search_rounds must be >= 0, got {self.rounds}")
        if self.work is not None and (isinstance(self.work, bool) or not isinstance(self.work, int)
                                      or self.work < 1):
            raise MixrankError(f"search_work must be >= 1 or None, got {self.work}")
        for name in ("evals", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MixrankError(f"search_{name} must be >= 1, got {v}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 0:
            raise MixrankError(f"search_groups must be >= 0, got {self.groups}")
        _check_seconds("search_seconds", self.seconds)


@dataclass
class Refine:
    """Refinements of method ``mixrank`` after the closed form; each ships only when it
    lowers the held-out output error (docs/design.md, "Refinements").

    Attributes:
        sparse: structure of the sparse term (``"none"``, ``"channel"``, ``"row"``).
        sparse_splits: per layer, up to this many rank steps of its budget may go to the
            sparse term; the split with the lowest layer error wins.
        alternate: rounds of alternating refits (``AB`` to ``W − S``, ``S`` to ``W − AB``).
        compensate_steps: Adam steps refining each layer on its own output loss (0: off).
        compensate_lr: its learning rate, relative to each tensor's mean magnitude.
        sequential: refit block by block on the compressed model's own activations.
        block_steps: Adam steps of block reconstruction in the sequential refit (0: off).
        block_lr: its learning rate, relative to each tensor's mean magnitude.
        block_seconds: wall-clock bound of all block reconstructions (``None``: none).
        distill_steps: Adam steps of end-to-end distillation of all factors (0: off).
        distill_lr: its starting learning rate, relative to each tensor's magnitude.
        distill_seconds: wall-clock bound of the distillation (``None``: none).
        distill_work: at most about this many multiply-adds through the selected layers go
            into distillation (steps × tokens of a step's batch × the selected layers'
            parameters; ``None``: ``distill_steps`` alone bounds it), so that its cost follows
            the model and the data: every one of 230 steps on the digits models, vit_small
            and MiniLM, 39 steps of 16 images of 197 tokens on deit_base.
        distill_target: what distillation trains on: ``"output"`` (the model's output in
            ``metric``), ``"tokens"`` (every token of the last repeated block's output) or
            ``"blocks"`` (every token of every block's output); the held-out batches still
            judge by the output.
    """

    sparse: str = "none"
    sparse_splits: int = 3
    alternate: int = 2
    compensate_steps: int = 200
    compensate_lr: float = 1e-3
    sequential: bool = True
    block_steps: int = 300
    block_lr: float = 1e-3
    block_seconds: float | None = None
    distill_steps: int = 300
    distill_lr: float = 1e-3
    distill_seconds: float | None = None
    distill_work: int | None = None
    distill_target: str = "blocks"

    def __post_init__(self) -> None:
        from ._sparse import SPARSE

        if self.distill_target not in ("output", "tokens", "blocks"):
            raise MixrankError(f"distill_target must be output, tokens or blocks, got {self.distill_target!r}")
        if self.sparse != "none" and self.sparse not in SPARSE:
            raise MixrankError(f"unknown sparse structure {self.sparse!r}; choose one of "
                               f"{', '.join(('none', *SPARSE.names()))}")
        for name in ("sparse_splits", "alternate", "compensate_steps", "block_steps", "distill_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MixrankError(f"{name} must be >= 0, got {v}")
        for name in ("compensate_lr", "block_lr", "distill_lr"):
            v = getattr(self, name)
            try:
                ok = float(v) > 0 and math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise MixrankError(f"{name} must be > 0, got {v}")
        if not isinstance(self.sequential, bool):
            raise MixrankError(f"sequential must be true or false, got {self.sequential!r}")
        v = self.distill_work
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MixrankError(f"distill_work must be >= 1 or None, got {v}")
        for name in ("block_seconds", "distill_seconds"):
            _check_seconds(name, getattr(self, name))


def _check_seconds(name: str, v) -> None:
    if v is None:
        return
    try:
        ok = float(v) > 0 and not isinstance(v, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MixrankError(f"{name} must be > 0 or None, got {v}")


_MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
                 "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_memory(v) -> int | None:
    """Bytes from an integer or a size such as ``"4GB"``, ``"512MiB"`` (``None`` stays;
    0 spills every Gram).

    Raises:
        MixrankError: anything else.
    """
    if v is None:
        return None
    n = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", v)
        if m and m.group(2).lower() in _MEMORY_UNITS:
            n = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])
    if n is None:
        raise MixrankError(f"max_memory must be a number of bytes or a size such as 4GB or 512MiB, got {v!r}")
    if n < 0:
        raise MixrankError(f"max_memory must be >= 0, got {v!r}")
    return n


SECTIONS = {"budget": Budget, "selection": Selection, "search": Search, "refine": Refine, "quantize": Quantize}
GENERAL = ("method", "effort", "metric", "damping", "holdout", "token_mask", "device", "seed", "max_seconds",
           "max_memory")
# Effort presets (like compression levels): what each fills in, for the settings the user
# left unset and the method reads. The measured time and error of each: README, "Effort".
EFFORTS: dict[str, dict[str, Any]] = {
    "fast": {"search_rounds": 1, "search_evals": 40, "search_groups": 1, "search_role_scales": (),
             "compensate_steps": 0, "sequential": False, "distill_steps": 0},
    "balanced": {"search_rounds": 3, "search_evals": 120, "search_groups": 3, "compensate_steps": 0,
                 "sequential": False, "block_steps": 0, "distill_steps": 230,
                 "distill_work": 10_500_000_000_000},
    "best": {"search_rounds": 6, "search_evals": 200, "compensate_steps": 200, "sequential": True,
             "block_steps": 300, "distill_steps": 300},
}
# flat names of section fields (the keyword arguments of CompressConfig and format-1 plans)
FLAT: dict[str, tuple[str, str]] = {
    **{k: ("budget", k) for k in ("keep", "params", "bytes", "dtype")},
    **{k: ("selection", k) for k in ("include", "exclude", "overrides", "rank_step", "min_rank", "structure")},
    **{f"search_{k}": ("search", k) for k in ("rounds", "evals", "seconds", "samples", "work", "groups",
                                               "role_scales")},
    **{k: ("quantize", k) for k in ("precision", "block", "quantizer", "split", "scheme")},
    **{f.name: ("refine", f.name) for f in dataclasses.fields(Refine)},
}


def _check_device(device) -> None:
    """A device this machine has: ``None``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise MixrankError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise MixrankError(f"device {device!r} asked for, but this machine has no usable CUDA GPU "
                               f"(torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise MixrankError(f"device {device!r} asked for, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise MixrankError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


def flat_name(section: str, name: str) -> str:
    """The flat (keyword-argument, command-line) name of a section field."""
    return f"search_{name}" if section == "search" else name


class CompressConfig:
    """How to compress a model: general settings plus the `Budget`, `Selection`,
    `Search` and `Refine` sections.

    Args:
        method: a registered method (``"mixrank"``, ``"whiten"``, ``"svd"``, ``"asvd"``,
            ``"oats"``; see `mixrank.compress.METHODS`).
        effort: ``"fast"`` (the closed form and a cheap allocation), ``"balanced"`` (the
            default) or ``"best"`` (every refinement at full length): a preset for the
            search and refinement settings left unset (`EFFORTS`).
        max_seconds: a wall-clock cap on the whole compression (``None``: none). Without
            one every bound counts work, so results do not depend on the machine's speed
            or load; with one, the plan records the stages it stopped.
        max_memory: bytes (or a size such as ``"4GB"``) the calibration Gram matrices
            may hold in memory; the largest beyond it are accumulated in memory-mapped
            files instead (``MIXRANK_SPILL_DIR``; the results do not change). ``None``:
            all in memory.
        metric: end-to-end output error that scores allocations and refinements:
            ``"kl"`` (logits), ``"mse"`` (normalised), ``"cosine"`` (1 − cosine) or
            ``"auto"`` (normalised MSE: a KL-scored search overfits the few ambiguous
            held-out samples that dominate KL; docs/design.md, "Scoring").
        damping: ``λ = damping · mean(diag G)`` added to the Gram matrix.
        holdout: fraction of the calibration batches held out to score allocations and
            refinements end to end (never used for statistics or distillation steps). A
            quarter: on MiniLM at keep 0.6 holding out a quarter instead of half raised the
            held-out texts' cosine from 0.946 to 0.951 (docs/design.md, "Scoring").
        token_mask: key of a dict batch holding a (batch, tokens) mask of the tokens to
            count (for example ``"attention_mask"``); ``None`` counts all.
        device: torch device for statistics and factorization (``None``: the model's).
        seed: seed for anything random.
        budget, selection, search, refine: the sections (``None``: defaults).
        **flat: section fields by flat name (``keep=0.4``, ``search_evals=40``,
            ``sparse="row"``, ...), routed to their section.

    Raises:
        MixrankError: an unknown or malformed setting, or one the method ignores.
    """

    def __init__(self, method: str = "mixrank", *, effort: str | None = None, metric: str = "auto",
                 damping: float = 1e-2, holdout: float = 0.25, token_mask: str | None = None,
                 device: str | None = None, seed: int = 0, max_seconds: float | None = None,
                 max_memory: int | str | None = None,
                 budget: Budget | dict | None = None,
                 selection: Selection | dict | None = None, search: Search | dict | None = None,
                 refine: Refine | dict | None = None, quantize: Quantize | dict | None = None, **flat: Any):
        self.method = method
        effort = "balanced" if effort is None else effort  # None means the default
        self.effort = effort
        self.max_seconds = max_seconds
        self.max_memory = parse_memory(max_memory)
        self.metric = metric
        self.damping = damping
        self.holdout = holdout
        self.token_mask = token_mask
        self.device = device
        self.seed = seed
        given = {"budget": budget, "selection": selection, "search": search, "refine": refine,
                 "quantize": quantize}
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for s, v in given.items():
            if isinstance(v, dict):
                parts[s].update(v)
            elif v is not None:
                if not isinstance(v, SECTIONS[s]):
                    raise MixrankError(f"{s} must be a {SECTIONS[s].__name__} or a dict")
                parts[s].update(dataclasses.asdict(v))
        for key, value in flat.items():
            if key not in FLAT:
                raise MixrankError(f"unknown setting {key!r}{close_matches(key, [*FLAT, *GENERAL])}")
            s, name = FLAT[key]
            parts[s][name] = value
        self._fill_effort(effort, parts)
        for s, cls in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(cls)}
            bad = set(parts[s]) - known
            if bad:
                raise MixrankError(f"unknown [{s}] setting(s) {sorted(bad)}; known: {sorted(known)}")
            setattr(self, s, cls(**parts[s]))
        self._validate()

    def _fill_effort(self, effort: str, parts: dict[str, dict[str, Any]]) -> None:
        """Fill in the preset's settings that the user left unset and the method reads."""
        from ._methods import METHODS

        if effort not in EFFORTS:
            raise MixrankError(f"unknown effort {effort!r}; choose one of {', '.join(EFFORTS)}"
                               f"{close_matches(str(effort), EFFORTS)}")
        reads = METHODS[self.method].settings()
        for flat, value in EFFORTS[effort].items():
            s, name = FLAT[flat]
            key = f"{s}.{name}"
            if s in ("search", "refine") and key not in reads:
                continue
            parts[s].setdefault(name, value)

    # ------------------------------------------------------------------ checks

    def _validate(self) -> None:
        from ._methods import METHODS, check_settings

        method = METHODS[self.method]
        if self.metric not in METRICS:
            raise MixrankError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        try:
            ok = 0.0 <= float(self.damping) and math.isfinite(float(self.damping))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MixrankError(f"damping must be >= 0, got {self.damping}")
        _fraction("holdout", self.holdout)
        _check_device(self.device)
        _check_seconds("max_seconds", self.max_seconds)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MixrankError(f"seed must be an integer, got {self.seed!r}")
        if self.token_mask is not None and not isinstance(self.token_mask, str):
            raise MixrankError(f"token_mask must be a key name, got {self.token_mask!r}")
        if self.refine.sparse == "none" and any(ov.get("sparse_k") for ov in self.selection.overrides.values()):
            raise MixrankError("a sparse_k override needs sparse='channel' or sparse='row'")
        q = self.quantize
        if q.precision is not None and self.budget.dtype != "float32":
            raise MixrankError(f"give precision={q.precision!r} or dtype={self.budget.dtype!r}, not both "
                               "(precision is the newer name)")
        if self.budget.dtype == "bfloat16":
            raise MixrankError("bfloat16 storage is not exported by any engine here; use precision='fp16'")
        if q.precision == "auto" and self.budget.bytes is None:
            raise MixrankError("precision='auto' chooses precision per layer under a bytes budget; give "
                               "bytes= (on the command line --bytes, e.g. --bytes 0.12x)")
        if self.selection.structure not in (None, "lowrank") and not method.pairs:
            users = [m for m in METHODS if METHODS[m].pairs]
            raise MixrankError(f"structure={self.selection.structure!r} is ignored by method {self.method!r}, which "
                               f"factors every layer on its own; pairwise forms are read by method "
                               f"{', '.join(users)}")
        if self.refine.sparse != "none" and self.storage in ("int8", "int4", "auto"):
            raise MixrankError(f"a sparse term is stored in floating point; it does not combine with "
                               f"precision {self.storage!r} (use sparse='none')")
        check_settings(self, method)

    # ------------------------------------------------------------------ views

    @property
    def structure(self) -> str:
        """``selection.structure``, with ``None`` resolved for the method."""
        from ._methods import METHODS

        if self.selection.structure is not None:
            return self.selection.structure
        return "auto" if METHODS[self.method].pairs else "lowrank"

    @property
    def storage(self) -> str:
        """The storage precision of compressed layers: ``quantize.precision``, else the
        one the budget's ``dtype`` stands for."""
        return self.quantize.precision or DTYPE_PRECISION[self.budget.dtype]

    def budget_params(self, total_params: int) -> int:
        """The parameter budget of the selected layers, given their dense total."""
        return self.budget.params_for(total_params)

    def to_dict(self) -> dict[str, Any]:
        """Nested dict: the general settings, then one dict per section."""
        d: dict[str, Any] = {k: getattr(self, k) for k in GENERAL}
        for s in SECTIONS:
            d[s] = dataclasses.asdict(getattr(self, s))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        """The inverse of `to_dict`; flat keys (format-1 factors files) are accepted too,
        and ``format_version`` (which format 1 stored here) is ignored."""
        if not isinstance(d, dict):
            raise MixrankError(f"a configuration must be a table, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "format_version"}
        general = {k: d.pop(k) for k in GENERAL if k in d}
        sections = {s: d.pop(s) for s in SECTIONS if s in d and isinstance(d[s], dict)}
        unknown = [k for k in d if k not in FLAT]
        if unknown:
            raise MixrankError(f"unknown config key(s) {sorted(unknown)}"
                               f"{close_matches(unknown[0], [*FLAT, *GENERAL, *SECTIONS])}")
        return cls(**general, **sections, **d)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> CompressConfig:
        """Read a TOML configuration (general keys at the top, sections as tables), with
        ``overrides`` (flat or general names, e.g. from the command line) on top."""
        raw = read_toml(path)
        merged = merge_settings(raw, overrides or {})
        try:
            return cls.from_dict(merged)
        except MixrankError as e:
            raise MixrankError(f"{path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CompressConfig({self.to_dict()!r})"


def merge_settings(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` (nested or flat) with ``changes`` (general or flat names) on top. A budget
    given in ``changes`` replaces the base's budget kind (``keep`` drops ``params``)."""
    out = {k: (dict(v) if isinstance(v, dict) and k in SECTIONS else v) for k, v in base.items()}
    for key, value in changes.items():
        if key in GENERAL:
            out[key] = value
            continue
        if key not in FLAT:
            raise MixrankError(f"unknown setting {key!r}{close_matches(key, [*FLAT, *GENERAL])}")
        s, name = FLAT[key]
        sec = out.setdefault(s, {})
        if not isinstance(sec, dict):
            raise MixrankError(f"[{s}] must be a table")
        for flat_key in list(out):  # a flat copy of the same setting in the base loses
            if FLAT.get(flat_key) == (s, name):
                del out[flat_key]
        if s == "budget" and name in ("keep", "params", "bytes"):
            for other in ("keep", "params", "bytes"):
                sec.pop(other, None)
                out.pop(other, None)
        sec[name] = value
    return out


def nest_settings(d: dict[str, Any]) -> dict[str, Any]:
    """A flat settings dict (format 1) in the nested form, without validating it: a
    file written by an older mixrank loads even where this one would refuse a setting."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key == "format_version":
            continue
        if key in FLAT:
            s, name = FLAT[key]
            out.setdefault(s, {})[name] = value
        else:
            out[key] = value
    return out


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file as a dict, or a `MixrankError` naming the file and the problem."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    p = Path(path)
    if not p.is_file():
        raise MixrankError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixrankError(f"{p}: not a UTF-8 text file (byte {e.start})") from None
    except OSError as e:
        raise MixrankError(f"cannot read {p}: {e.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MixrankError(f"{p}: not valid TOML: {e}") from None
