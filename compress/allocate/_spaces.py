"""The space of choices of each layer (`LayerSpace`: ranks, dense, a precision, a form),
what an allocation costs, and the record of every allocation scored (`Candidate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from mixrank.core import MixrankError, Record

from ..factor import LayerForm, PairForm, form_of
from ..store import storage_bytes

Alloc = dict[str, "int | None"]  # layer -> rank, None = dense


@dataclass
class LayerSpace:
    """The choices of one layer: ranks ``floor, floor+step, ..., cap`` or dense, at one
    storage ``precision`` and in one layer ``form`` (`FORMS`). ``cost`` is in the budget's
    ``unit``: parameters, or bytes as the exporter stores them (integer blocks padded,
    scales and zero points included); the form says what a rank costs."""

    name: str
    m: int
    n: int
    floor: int
    cap: int  # largest rank (multiple of step) that costs less than the dense layer
    step: int = 8
    fixed: int | None = None  # a fixed rank from an override
    dense: bool = False  # forced dense (override, or no rank saves anything)
    unit: str = "params"
    precision: str = "fp32"
    block: int = 32
    symmetric: bool = False
    form: str = "lowrank"  # a `FORMS` name: a pair's layers are "rows" / "cols", one factor plus an index
    bias_delta: bool = False  # a pair's layer that stores a new bias (m values)
    tie: str | None = None  # the pair's other layer: both always have the same rank
    residual_precision: str = ""  # the "residual" form's dense term: its precision and block
    residual_block: int = 0

    @property
    def free(self) -> bool:
        """Its rank may move (not dense, not fixed by an override)."""
        return not self.dense and self.fixed is None

    @property
    def kind(self) -> LayerForm:
        """The registered form (`FORMS`)."""
        return form_of(self.form)

    def extra(self, r: int) -> int:
        """What the form adds to its factors at rank ``r``, in 4-byte values as the
        exporter writes them (`LayerForm.extra`: a pair's indices, mask, bias delta)."""
        return self.kind.extra(self.m, r, self.bias_delta)

    def per_rank(self) -> int:
        """Parameters one unit of rank costs (a ``cols`` form's index entry included)."""
        return self.kind.per_rank(self.m, self.n)

    def params(self, r: int | None) -> int:
        """The cost of rank ``r`` (``None``: dense) in parameters (`LayerForm.cost_params`)."""
        return self.m * self.n if r is None else self.kind.cost_params(self.m, self.n, r, self.bias_delta)

    def cost(self, r: int | None) -> int:
        """The cost of rank ``r`` (``None``: dense) in the budget's unit."""
        return self.params(r) if self.unit == "params" else self.stored_bytes(r)

    def stored_bytes(self, r: int | None) -> int:
        """Bytes as the exporter stores rank ``r`` (``None``: dense) at this precision."""
        if r is None:
            return storage_bytes(self.m, self.n, self.precision, self.block, self.symmetric)
        return self.kind.stored_bytes(self, r)

    def value_cost(self, r: int | None, value_bytes: int) -> int:
        """The cost in values of ``value_bytes`` (what a sparse term's size is counted in)."""
        return self.cost(r) if self.unit == "params" else self.cost(r) // value_bytes


def layer_spaces(
    shapes: dict[str, tuple[int, int]], step: int, min_rank: int, overrides: dict[str, dict],
    unit: str = "params", precision: str = "fp32", block: int = 32, symmetric: bool = False,
    forms: dict[str, PairForm] | None = None,
) -> dict[str, LayerSpace]:
    """Each layer's space of ranks.

    Args:
        shapes: layer → (out, in).
        step: the rank grid's step; min_rank: the floor of every compressed layer.
        overrides: layer → its ``dense``, ``rank`` or ``min_rank`` override.
        unit: the budget's unit (``"params"`` or ``"bytes"``); precision, block,
            symmetric: how the layers are stored.
        forms: a pair's layers' `PairForm` (form, bias delta, partner, largest size);
            every other layer is ``lowrank``.

    Raises:
        MixrankError: a fixed rank that saves nothing.
    """
    spaces = {}
    forms = forms or {}
    for name, (m, n) in shapes.items():
        ov = overrides.get(name, {})
        pf = forms.get(name)
        sp = LayerSpace(name, m, n, 0, 0, step, unit=unit, precision=precision, block=block, symmetric=symmetric,
                        form="lowrank" if pf is None else pf.form, bias_delta=pf is not None and pf.bias_delta,
                        tie=None if pf is None else pf.partner)
        dense_cost = sp.cost(None)
        limit = sp.kind.max_rank(m, n, 0 if pf is None else pf.size)
        while limit > 0 and sp.cost(limit) >= dense_cost:  # bytes: padding and scales count too
            limit -= 1
        sp.cap = (limit // step) * step
        floor = max(min_rank, ov.get("min_rank", 0))
        sp.floor = int(math.ceil(floor / step) * step)
        if ov.get("dense"):
            sp.dense = True
        elif "rank" in ov:
            if ov["rank"] > limit:
                raise MixrankError(
                    f"override {name!r}: rank {ov['rank']} saves no parameters for a {m}x{n} "
                    f"layer (max useful rank {limit}); use dense=True instead"
                )
            sp.fixed = int(ov["rank"])
        elif sp.cap < sp.floor:
            sp.dense = True  # too small for any rank >= floor to save anything
        spaces[name] = sp
    for sp in spaces.values():  # a pair moves as one: the same rank grid on both layers
        if sp.tie is not None and sp.tie in spaces:
            other = spaces[sp.tie]
            sp.cap = other.cap = min(sp.cap, other.cap)
            sp.floor = other.floor = max(sp.floor, other.floor)
            sp.dense = other.dense = sp.dense or other.dense or sp.cap < sp.floor
    return spaces


def alloc_cost(spaces: dict[str, LayerSpace], alloc: Alloc) -> int:
    """What ``alloc`` costs in the budget's unit."""
    return sum(spaces[n].cost(r) for n, r in alloc.items())


def feasible_range(spaces: dict[str, LayerSpace]) -> tuple[int, int]:
    """(smallest, largest) parameter count an allocation can have while compressing."""
    lo = hi = 0
    for sp in spaces.values():
        if sp.dense:
            lo += sp.cost(None)
            hi += sp.cost(None)
        elif sp.fixed is not None:
            lo += sp.cost(sp.fixed)
            hi += sp.cost(sp.fixed)
        else:
            lo += sp.cost(sp.floor)
            hi += sp.cost(sp.cap)
    return lo, hi


@dataclass(eq=False)
class Candidate(Record):
    """An allocation the allocator scored, as the plan records it (``allocation.candidates``).

    Attributes:
        name: ``"uniform"``, a family such as ``"uniform int8 pairs"``, or a search step
            (``"r1.probe"``, ``"r1.move0"``, ``"r1.accepted"``, ``"roles1.probe"``).
        score: its held-out output error.
        params: its cost in the budget's unit (parameters, or bytes under a bytes budget;
            the key is the factors format's).
        ranks: every layer's rank (``None``: dense), or else ``base`` (the name of the
            allocation it changes) and ``delta`` (layer → rank change).
        cost, precision: a family's cost (the same as ``params``) and storage precision.
        scale, role: a role-scale probe's factor and the first layer of its role.
    """

    _optional: ClassVar[frozenset[str]] = frozenset({"ranks", "base", "delta", "cost", "precision", "scale",
                                                     "role"})

    name: str
    score: float
    params: int
    ranks: dict | None = None
    base: str | None = None
    delta: dict | None = None
    cost: int | None = None
    precision: str | None = None
    scale: float | None = None
    role: str | None = None
