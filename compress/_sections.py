"""The sections of a `CompressConfig`: `Budget`, `Selection`, `Search`, `Refine` and
`Quantize`, each a dataclass that validates itself, and the flat names that route a
keyword argument (``keep=0.4``, ``search_evals=40``) to its section.

The sections read no registry but the sparse structures', so every stage can take the
section it needs without the configuration as a whole (`mixrank.compress._config`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from mixrank.core import MixrankError, is_number

from .factor.sparse import SPARSE
from .store import BLOCKS, GRIDS, PRECISIONS, SPLITS

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# the storage precision a deprecated ``dtype`` stands for (bfloat16 is not stored by any engine here)
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "int8": "int8"}
OVERRIDE_KEYS = ("dense", "rank", "min_rank", "sparse_k")
STRUCTURES = ("auto", "lowrank", "pairs")
SEARCH_FORMS = ("dense", "lowrank", "residual")


def check_fraction(name: str, value, text: bool = False) -> None:
    """A fraction in (0, 1); ``text``: given as text (the ``NN`` of ``"NNx"``).

    Raises:
        MixrankError: anything else (names the setting).
    """
    if text:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise MixrankError(f"{name} must be a number, got {value!r}") from None
    if not is_number(value):
        raise MixrankError(f"{name} must be a number, got {value!r}")
    if not 0.0 < value < 1.0:
        raise MixrankError(f"{name} must be a fraction in (0, 1), got {value}")


@dataclass
class Budget:
    """How much the selected layers keep: one of ``keep``, ``params`` or ``bytes``.

    Attributes:
        keep: the fraction of the selected layers' weight parameters kept (``keep=0.4``
            removes 60 %).
        params: an absolute parameter count for the selected layers, or ``"0.4x"``: that
            fraction of the whole model's parameters, the weights left out of the selection
            counted as they are (``--like``: a smaller sibling's count).
        bytes: the selected layers' storage as the exporter writes it (values at their
            precision, plus the scales and zero points of integer blocks, plus sparse
            indices), as a byte count, or as ``"0.12x"``: that fraction of the whole
            model's float32 weight bytes, the weights left out of the selection counted at
            float32. With none of the three: ``keep=0.5``.

        dtype: deprecated; the storage precision is `Quantize.precision` (``"float16"``
            here is precision ``"fp16"``). Giving one other than ``"float32"`` warns.

        The whole model, for a fraction, leaves out lookup tables (``nn.Embedding``: a
        text model's token and position embeddings, half of MiniLM), which no method
        compresses and no MatMul reads (`countable_params`).
    """

    keep: float | None = None
    params: int | str | None = None
    bytes: int | str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("params", "bytes"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = v.strip()
                setattr(self, name, v)
                if not v.endswith("x"):
                    what = "parameter count or a fraction of the model's parameters such as '0.4x'" \
                        if name == "params" else "byte count or a fraction of the model's float32 weight bytes " \
                        "such as '0.12x'"
                    raise MixrankError(f"{name} must be a {what}, got {v!r}")
                check_fraction(f"{name} (as a fraction, 'NNx')", v[:-1], text=True)
        given = [k for k in ("keep", "params", "bytes") if getattr(self, k) is not None]
        if len(given) > 1:
            raise MixrankError(f"give one budget, not {' and '.join(given)}")
        if not given:
            self.keep = 0.5
        if self.keep is not None:
            check_fraction("keep", self.keep)
        for name in ("params", "bytes"):
            v = getattr(self, name)
            if isinstance(v, str):
                continue
            if v is not None and (not is_number(v) or int(v) <= 0):
                what = "parameter" if name == "params" else "byte"
                raise MixrankError(f"{name} must be a positive {what} count, got {v}")
        if self.dtype not in DTYPE_BYTES:
            raise MixrankError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        if self.dtype != "float32":
            warnings.warn(f"dtype={self.dtype!r} is deprecated: the storage precision is precision="
                          f"{DTYPE_PRECISION.get(self.dtype, self.dtype)!r}", FutureWarning, stacklevel=4)

    @property
    def unit(self) -> str:
        """What the budget counts: ``"bytes"`` (as the exporter stores them) for a bytes
        budget, else ``"params"``."""
        return "bytes" if self.bytes is not None else "params"

    def resolve(self, selected_params: int, model_params: int) -> int:
        """The budget of the selected layers in its `unit`, given their dense parameter
        count and the whole model's (`params_for`, `bytes_for`)."""
        return self.bytes_for(selected_params, model_params) if self.unit == "bytes" else \
            self.params_for(selected_params, model_params)

    def params_for(self, total_params: int, model_params: int | None = None) -> int:
        """The parameter budget of the selected layers, given their dense total (and, for
        a fraction ``"0.4x"``, the whole model's countable parameters)."""
        if self.keep is not None:
            return int(math.floor(self.keep * total_params))
        if self.params is not None:
            if isinstance(self.params, str):
                return self._fraction("params", total_params, model_params, 1)
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
        return self._fraction("bytes", selected_params, model_params, 4)

    def _fraction(self, name: str, selected_params: int, model_params: int | None, width: int) -> int:
        if model_params is None:
            raise MixrankError(f"{name} as a fraction of the model needs the model's parameter count")
        frac = float(getattr(self, name)[:-1])
        rest = width * (model_params - selected_params)
        budget = int(math.floor(frac * width * model_params)) - rest
        if budget <= 0:
            unit = "bytes" if width == 4 else "parameters"
            raise MixrankError(f"{name} {getattr(self, name)} of the model is {frac * width * model_params:,.0f} "
                               f"{unit}, but the weights not selected for compression already take {rest:,} "
                               f"{unit}{' at float32' if width == 4 else ''}; raise the fraction or select more "
                               "layers (include=...)")
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
            shrink their shared dimension instead; `mixrank.compress.factor.pairs`) or ``"auto"``
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
            if pats is not None and (not isinstance(pats, list | tuple) or not all(isinstance(p, str) for p in pats)):
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
        precision: ``"fp32"``, ``"fp16"``, ``"int8"``, ``"int4"``, ``"int2"`` for every
            compressed layer, or ``"auto"`` (a ``bytes`` budget only): form, rank, precision
            and block are chosen per layer end to end, with the original weights dense at
            every integer width among the candidates, so the result is never worse than
            quantization alone at the same bytes. ``None``: ``"auto"`` with a bytes budget
            (for a method whose fits are closed forms, without a sparse term), else fp32.
        block: integer block size along the reduction axis (onnxruntime's ``MatMulNBits``).
        quantizer: ``"gptq"`` (rounding errors fed forward through the layer's input
            Gram matrix) or ``"rtn"`` (round to nearest, what onnxruntime's quantizer does).
        split: how a factor pair is scaled before storage: ``"balanced"`` (``A = U Σ^½``,
            ``B = Σ^½ Vᵀ L⁻¹``), ``"u"`` (``A = U``) or ``"us"`` (``A = U Σ``). Float
            precisions are stored as fitted.
        scheme: ``"asymmetric"`` (a zero point per block; onnxruntime) or ``"symmetric"``
            (no zero points; what TensorRT's dequantize accepts, and onnxruntime too).
        grid: each block's range: ``"mse"`` (the range that rounds the block with the
            least squared error, its min/max shrunk by up to half) or ``"minmax"`` (its
            min and max, what onnxruntime's quantizer does).
        widths: the integer precisions ``precision="auto"`` may choose, for dense layers,
            factors and the residual form (default: int8, int4 and int2; an artifact for
            TensorRT leaves int2 out, since TensorRT dequantizes INT8 and INT4 only).
        compute: how the engine will multiply by int8 weights, as the allocation scores them:
            ``"exact"`` (the stored weight in float arithmetic: ``MatMulNBits`` or the
            expanded form) or ``"dynamic"`` (onnxruntime's dynamic int8, the artifact's
            ``--int-weights dynamic``: requantized per output channel, each activation
            quantized to uint8 as it runs; `mixrank.compress.store.dynamic_linear`). The
            refinements' guard scores that way too; the refinements themselves train through
            the weights' rounding only.
    """

    precision: str | None = None
    block: int = 32
    quantizer: str = "gptq"
    split: str = "balanced"
    scheme: str = "asymmetric"
    grid: str = "mse"
    widths: tuple[str, ...] = ("int8", "int4", "int2")
    compute: str = "exact"

    def __post_init__(self) -> None:
        if self.compute not in ("exact", "dynamic"):
            raise MixrankError(f"unknown compute {self.compute!r}; choose exact or dynamic")
        if self.precision is not None and self.precision not in (*PRECISIONS, "auto"):
            raise MixrankError(f"unknown precision {self.precision!r}; choose one of "
                               f"{', '.join((*PRECISIONS, 'auto'))}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block not in BLOCKS:
            raise MixrankError(f"block must be one of {', '.join(map(str, BLOCKS))} (onnxruntime's "
                               f"MatMulNBits), got {self.block!r}")
        if self.quantizer not in ("gptq", "rtn"):
            raise MixrankError(f"unknown quantizer {self.quantizer!r}; choose gptq or rtn")
        if self.split not in SPLITS:
            raise MixrankError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if self.scheme not in ("asymmetric", "symmetric"):
            raise MixrankError(f"unknown scheme {self.scheme!r}; choose asymmetric or symmetric")
        if self.grid not in GRIDS:
            raise MixrankError(f"unknown grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        ints = [p for p in PRECISIONS if p.startswith("int")]
        if isinstance(self.widths, str) or not isinstance(self.widths, list | tuple) or not self.widths \
                or any(w not in ints for w in self.widths):
            raise MixrankError(f"widths must be a non-empty list of {', '.join(ints)}, got {self.widths!r}")
        self.widths = tuple(w for w in ints if w in self.widths)  # one order, whatever the file's

    def allows(self, precision: str) -> bool:
        """Whether ``precision="auto"`` may store at ``precision``: a float one, or one of `widths`."""
        return not precision.startswith("int") or precision in self.widths


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
            such bound), so that a candidate costs about the same on any model.
        groups: probe layers in groups of one role within each of this many spans of the
            depth (a round then costs ~2·roles·groups evaluations instead of 2 per layer);
            0 probes each layer alone.
        role_scales: before the rounds, each role's fraction of the budget scaled by each
            of these factors (the other roles share what is left), in two passes; the best
            start wins if it beats uniform (``()``: off). Costs up to 4·roles evaluations.
        forms: with ``precision="auto"``, the forms the allocation over every form offers each
            layer: ``"dense"`` (every integer width and block), ``"lowrank"`` (factors at a few
            ranks), ``"residual"`` (low rank plus a quantized dense residual; one residual fit
            per layer and option, the costliest to measure).
    """

    rounds: int = 6
    evals: int = 200
    seconds: float | None = None
    samples: int = 128
    work: int | None = 350_000_000_000
    groups: int = 0
    role_scales: tuple[float, ...] = (0.6, 1.6)
    forms: tuple[str, ...] = ("dense", "lowrank", "residual")

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
        if isinstance(self.forms, str) or not all(isinstance(f, str) for f in self.forms):
            raise MixrankError(f"search_forms must be a list of forms, got {self.forms!r}")
        self.forms = tuple(self.forms)
        bad = [f for f in self.forms if f not in SEARCH_FORMS]
        if bad or "dense" not in self.forms:
            raise MixrankError(f"search_forms must include dense and be among {', '.join(SEARCH_FORMS)}, got "
                               f"{list(self.forms)}")
        check_seconds("search_seconds", self.seconds)


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
            the model and the data.
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
            if not (is_number(v) and v > 0):
                raise MixrankError(f"{name} must be > 0, got {v!r}")
        if not isinstance(self.sequential, bool):
            raise MixrankError(f"sequential must be true or false, got {self.sequential!r}")
        v = self.distill_work
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MixrankError(f"distill_work must be >= 1 or None, got {v}")
        for name in ("block_seconds", "distill_seconds"):
            check_seconds(name, getattr(self, name))


def check_seconds(name: str, v) -> None:
    """A wall-clock bound: ``None`` or a number > 0.

    Raises:
        MixrankError: anything else (names the setting).
    """
    if v is None:
        return
    if not (is_number(v) and v > 0):
        raise MixrankError(f"{name} must be a number > 0 or None, got {v!r}")


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
# flat names of section fields (the keyword arguments of CompressConfig and format-1 plans)
FLAT: dict[str, tuple[str, str]] = {
    **{k: ("budget", k) for k in ("keep", "params", "bytes", "dtype")},
    **{k: ("selection", k) for k in ("include", "exclude", "overrides", "rank_step", "min_rank", "structure")},
    **{f"search_{k}": ("search", k) for k in ("rounds", "evals", "seconds", "samples", "work", "groups",
                                               "role_scales", "forms")},
    **{k: ("quantize", k) for k in ("precision", "block", "quantizer", "split", "scheme", "grid", "widths",
                                     "compute")},
    **{f.name: ("refine", f.name) for f in dataclasses.fields(Refine)},
}



def flat_name(section: str, name: str) -> str:
    """The flat (keyword-argument, command-line) name of a section field."""
    return f"search_{name}" if section == "search" else name



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
