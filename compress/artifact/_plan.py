"""The typed, versioned plan stored in a factors file (docs/design.md, "The factors file").

Each part of the plan is a dataclass whose instances are also the JSON objects they
serialise to (a `mixrank.core.Record` is a ``dict`` whose declared fields are attributes too): readers
write ``plan.layers[name].rank``, ``json.dumps(plan)`` writes the file's metadata, and a
plan compares equal to the dict it was read from. Keys a newer writer added are kept.
`Plan.from_dict` reads every format this version knows and upgrades older ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mixrank.core import MixrankError, Record

from .._sections import nest_settings

FORMAT_VERSION = 4  # 4: the residual form and int2, a block per layer; 3: pairwise forms; 2, 1: all low rank
READABLE_VERSIONS = (1, 2, 3, 4)


@dataclass(eq=False)
class SparsePlan(Record):
    """The sparse term of a layer: structure, size k, stored values and indices, and
    its cost in parameter equivalents (values plus index storage)."""

    _zeros: ClassVar[dict[str, Any]] = {"structure": "none"}

    structure: str
    k: int
    indices: int
    params: int
    values: int = dataclasses.field(default=0)
    """Stored sparse values. (An explicit default: ``dict.values`` would be taken for one;
    on a `SparsePlan` the attribute is this count, ``dict.values(plan)`` the method.)"""


@dataclass(eq=False)
class LayerPlan(Record):
    """One selected layer: dense, or factored at ``rank`` (plus a sparse term)."""

    _nested: ClassVar[dict[str, type]] = {"sparse": SparsePlan}
    _zeros: ClassVar[dict[str, Any]] = {"precision": "fp32", "form": "lowrank"}

    shape: list[int]
    """(out, in) of the original weight."""
    rank: int | None
    dense: bool
    precision: str
    """How the factors (or a dense layer's weight) are stored: fp32, fp16, int8, int4."""
    sparse: SparsePlan
    nmse: float
    """Layer NMSE of the shipped factors on the statistics batches."""
    nmse_closed_form: float
    """Layer NMSE of the closed form at the allocated rank."""
    params_before: int
    params_after: int
    """Stored values: ``rank·(out+in)`` plus the sparse values."""
    cost_params: int
    """Values plus index storage in value equivalents."""
    cost: int
    """What the budget counted, in its unit (parameters, or bytes as stored)."""
    bytes_after: int
    """Bytes as the exporter stores them (integer codes packed, scales, zero points)."""
    sha256: str
    """SHA-256 of the original weight's float32 bytes: the rewriter's fingerprint."""
    sha256_fp16: str
    """The same of the weight rounded to float16 (fp16 graphs)."""
    bias: bool
    tokens: int
    """Calibration tokens summed into the layer's Gram matrix."""
    form: str
    """``lowrank`` (``A B``; also what an older file's empty value means), or for a layer
    of a pair ``rows`` (only ``rank`` output rows computed: ``<name>.B`` and
    ``<name>.index``) or ``cols`` (only ``rank`` input columns read: ``<name>.A`` and
    ``<name>.index``)."""
    pair: str
    """The pair a ``rows``/``cols`` layer belongs to, ``kind:first+second`` (``""``: none);
    its ``nmse`` is then the pair's relative error, the same for both layers."""
    bias_delta: bool
    """Whether ``<name>.bias_delta`` (added to the original bias) is stored."""
    block: int
    """The integer block of the layer's factors (or of its dense weight); 0: stored as
    floats (or a file older than format 4, whose blocks are the config's)."""
    residual_precision: str
    """The ``residual`` form's dense term ``<name>.W``: its precision (``""``: no such term)."""
    residual_block: int
    """Its integer block (0: none)."""


@dataclass(eq=False)
class SourceInfo(Record):
    model: str
    checkpoint_sha256: str


@dataclass(eq=False)
class BudgetInfo(Record):
    """The budget as given (one of keep, params, bytes) and as counted."""

    _zeros: ClassVar[dict[str, Any]] = {"precision": "fp32", "unit": "params"}

    keep: float | None
    params: int | str | None
    bytes: int | str | None
    dtype: str
    precision: str
    """Storage of the compressed layers (``auto``: chosen per layer)."""
    unit: str
    """What the budget counts: ``params``, or ``bytes`` as stored."""
    budget: int
    """The budget in its unit."""
    budget_params: int | None
    """The parameter budget (float storage only)."""
    selected_params: int
    """The selected layers' dense parameter count."""
    selected_bytes: int
    """Their float32 bytes."""


@dataclass(eq=False)
class CalibrationInfo(Record):
    """What calibrated: statistics batches and samples, and the held-out part that scored."""

    source: str
    seed: int
    batches: int
    """Batches summed into the Gram matrices (the held-out ones excluded)."""
    samples: int
    holdout_batches: int
    """Batches held out to score allocations and refinements."""
    holdout_samples: int


@dataclass(eq=False)
class RefinementInfo(Record):
    """Every variant scored on the held-out batches (closed form first), the one chosen
    and its score. A variant is ``{"name", "score", ...}``; ``score`` is ``None`` with a
    ``note`` when the refinement did not apply."""

    variants: list[dict]
    chosen: str
    score: float | None


@dataclass(eq=False)
class AllocationInfo(Record):
    _nested: ClassVar[dict[str, type]] = {"refinement": RefinementInfo}
    _zeros: ClassVar[dict[str, Any]] = {"family": "uniform"}

    metric: str
    family: str
    """Where the allocation started: ``uniform``, ``uniform int8``, or ``dense int8
    (quantization alone)`` when storing the original weights at int8 won."""
    uniform_score: float | None
    chosen_score: float | None
    refinement: RefinementInfo
    evaluations: int
    stopped: str
    scored_samples: int
    candidates: list[dict]


@dataclass(eq=False)
class Totals(Record):
    """Sums over the selected layers, and the whole model's parameter counts."""

    params_before: int
    params_after: int
    cost_params: int
    """Values plus index storage in value equivalents."""
    cost: int
    """What the budget counted, in its unit."""
    bytes_before: int
    """The selected layers' float32 bytes."""
    bytes_after: int
    """Their bytes as the exporter stores them."""
    model_params_before: int
    model_params_after: int


@dataclass(eq=False)
class Plan(Record):
    """The whole plan. ``config`` is the `CompressConfig` as a dict (nested since format
    2; `CompressConfig.from_dict` reads both forms). Nothing in it depends on the clock
    (timings live on `Factors.timings`, not in the file), so the same inputs give the
    same bytes."""

    _nested: ClassVar[dict[str, type]] = {
        "source": SourceInfo, "budget": BudgetInfo, "calibration": CalibrationInfo,
        "allocation": AllocationInfo, "totals": Totals}
    _tables: ClassVar[dict[str, type]] = {"layers": LayerPlan}
    _optional: ClassVar[frozenset[str]] = frozenset({"latency"})
    _zeros: ClassVar[dict[str, Any]] = {"latency": None}

    format_version: int
    method: str
    source: SourceInfo
    budget: BudgetInfo
    calibration: CalibrationInfo
    config: dict
    layers: dict[str, LayerPlan]
    allocation: AllocationInfo
    totals: Totals
    limits: dict
    """``max_seconds`` (the wall-clock cap asked for, ``None``: none) and the stages that
    stopped on it: a result with stages listed there depends on the machine's speed."""
    latency: dict | None = None
    """Under a latency budget (``None``: none), `LatencyBudget.record`: the budget as asked
    and in ms at its batch, the predicted time of the whole model and of each selected
    layer, the original's measured time, and the table's engine and SHA-256."""

    def factored_layers(self) -> list[str]:
        """The layers stored as factors (not dense), in plan order."""
        return [n for n, info in self.layers.items() if not info.dense]

    @classmethod
    def empty(cls) -> Plan:
        return cls.from_dict({"format_version": FORMAT_VERSION})

    @classmethod
    def read(cls, d: dict[str, Any], where: str = "the plan") -> Plan:
        """Read a plan of any format this version knows, upgraded to `FORMAT_VERSION`.

        Raises:
            MixrankError: an unknown format version.
        """
        if not isinstance(d, dict):
            raise MixrankError(f"{where} is not a JSON object")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:  # true == 1 in Python
            raise MixrankError(f"{where} has factors format version {version}; this mixrank reads "
                               f"version{'s' if len(READABLE_VERSIONS) > 1 else ''} "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")
        d = dict(d)
        if version == 1:  # format 1: flat config carrying its own format_version
            if not isinstance(d.get("config") or {}, dict):
                raise MixrankError(f"{where}: malformed plan: its config must be an object")
            d["config"] = nest_settings(d.get("config") or {})
            d["format_version"] = FORMAT_VERSION
            d["upgraded_from"] = 1
        try:
            return cls.from_dict(d)
        except MixrankError as e:
            raise MixrankError(f"{where}: {e}") from None
