"""Latency budgets (docs/design.md, "Latency budgets"): the time each layer's choice takes
on the target engine, from a table of matrix products measured there once
(`LatencyTable`, written by `mixrank.engines.latency_table`), and the budget an
allocation must meet besides its bytes (`LatencyBudget`).

The model of a choice's time: the products its form runs (`LayerForm.products`), each
looked up in the table at the layer's tokens per batch, a factor's rank interpolated
between the ranks measured; the whole model's time is what the original takes on the
engine less its selected layers' dense products (the attention, the norms, every layer
not selected: the same in every plan), plus each layer's choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from mixrank.core import MixrankError

from ..factor import form_of
from ._spaces import Alloc, LayerSpace

TABLE_FORMAT = "mixrank latency table 1"
COMPUTES = ("float", "dynamic")
# a shape's timed curves: the factors' two products, and the gather and the masked scatter of a pair's layers
SIDES = ("in", "out", "gather", "scatter")  # float32 products (fp32, fp16 and expanded integer weights); dynamic int8


def _interp(points: dict[int, float], r: int) -> float:
    """Piecewise-linear in the rank through the measured ``points`` (rank → ms), the end
    segments extended (a rank beyond the grid)."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]] * r / xs[0]
    if r <= xs[0]:
        lo, hi = xs[0], xs[1]
    elif r >= xs[-1]:
        lo, hi = xs[-2], xs[-1]
    else:
        hi = next(x for x in xs if x >= r)
        lo = xs[xs.index(hi) - 1]
    t = (r - lo) / (hi - lo)
    return max(0.0, points[lo] + t * (points[hi] - points[lo]))


@dataclass(frozen=True)
class LatencyTable:
    """Matrix products timed on one engine, for the layers of one model at one batch.

    Attributes:
        engine: what measured it (engine, version, threads, provider: the cache's key).
        batch: the batch size it holds times for.
        original_ms: the whole original model's median latency at ``batch`` on the engine.
        layers: layer → its shape key (``"TxMxN"``: tokens per batch, out, in).
        shapes: shape key → ``{"dense": {compute: ms}, "in": {compute: {rank: ms}},
            "out": {compute: {rank: ms}}, "gather": {"float": {rank: ms}}, "scatter": ...}``
            (``COMPUTES``; `SIDES`).
    """

    engine: dict
    batch: int
    original_ms: float
    layers: dict[str, str]
    shapes: dict[str, dict]

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, "engine": self.engine, "batch": self.batch, "original_ms": self.original_ms,
                "layers": self.layers, "shapes": self.shapes}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d, where: str = "the latency table") -> LatencyTable:
        """Read a table (``latency.json``).

        Raises:
            MixrankError: not a table of this format, or one whose times are not
                positive numbers.
        """
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            raise MixrankError(f"{where} is not a {TABLE_FORMAT!r} file")
        try:
            shapes = {k: {"dense": {c: float(v) for c, v in s["dense"].items()},
                          **{side: {c: {int(r): float(v) for r, v in pts.items()} for c, pts in s[side].items()}
                             for side in SIDES if side in s}}
                      for k, s in d["shapes"].items()}
            table = cls(dict(d["engine"]), int(d["batch"]), float(d["original_ms"]),
                        {str(n): str(k) for n, k in d["layers"].items()}, shapes)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MixrankError(f"{where} is malformed ({type(e).__name__}: {e})") from None
        values = [table.original_ms, *(v for s in shapes.values() for v in s["dense"].values()),
                  *(v for s in shapes.values() for side in SIDES if side in s for pts in s[side].values()
                    for v in pts.values())]
        if not all(math.isfinite(v) and v > 0 for v in values) or any(k not in shapes for k in table.layers.values()):
            raise MixrankError(f"{where} is malformed: every time must be a positive number, every layer's shape "
                               "in the table")
        return table

    def product_ms(self, layer: str, shape: str, compute: str, r: int | None) -> float:
        """One product of ``layer`` (``shape``: ``"dense"``, ``"in"``, ``"out"``) at rank ``r``."""
        key = self.layers.get(layer)
        if key is None:
            raise MixrankError(f"the latency table has no layer {layer!r}: it was measured for another model "
                               "or selection")
        if shape not in self.shapes[key]:
            raise MixrankError(f"the latency table has no {shape} times for {layer!r}: it predates them; "
                               "measure it again")
        entry = self.shapes[key][shape]
        if shape in ("gather", "scatter"):
            compute = "float"  # moves activations, not weights
        if compute not in entry:
            raise MixrankError(f"the latency table has no {compute} products for {layer!r}; measure it with "
                               f"compute {compute}")
        return entry[compute] if shape == "dense" else _interp(entry[compute], int(r))

    def dense_ms(self) -> float:
        """The selected layers' dense float products, summed."""
        return math.fsum(self.product_ms(n, "dense", "float", None) for n in self.layers)


def parse_latency(text: str) -> tuple[str, float]:
    """``--latency``: ``"0.5x"`` (a fraction of the original's measured latency) or
    ``"12ms"`` (milliseconds); a bare number is refused (0.5 could mean either). Returns
    (``"x"`` or ``"ms"``, the value).

    Raises:
        MixrankError: anything else, or a value that is not positive (or a fraction not below 1).
    """
    t = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|ms)", t)
    if not m:
        raise MixrankError(f"--latency must be a fraction of the original's latency such as 0.5x, or milliseconds "
                           f"such as 12ms, got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(value) or value <= 0 or (unit == "x" and value >= 1):
        raise MixrankError(f"--latency {text!r}: a fraction must be in (0, 1), milliseconds positive")
    return unit, value


@dataclass(frozen=True)
class LatencyBudget:
    """The latency an allocation must meet, and the model that predicts it.

    Attributes:
        table: the `LatencyTable` measured on the target.
        limit_ms: the budget in milliseconds at the table's batch.
        compute: how the engine computes int8 weights: ``"exact"`` (float32, as expanded) or
            ``"dynamic"`` (int8, `Quantize.compute`); every other precision computes in float32.
        asked: the budget as given (``"0.5x"``, ``"12ms"``).
    """

    table: LatencyTable
    limit_ms: float
    compute: str = "exact"
    asked: str = ""

    @classmethod
    def of(cls, table: LatencyTable, text: str, compute: str = "exact") -> LatencyBudget:
        """The budget ``text`` (`parse_latency`) against ``table``."""
        unit, value = parse_latency(text)
        return cls(table, value * table.original_ms if unit == "x" else value, compute, str(text).strip())

    @property
    def rest_ms(self) -> float:
        """What the original takes beyond its selected layers' products (at least 0)."""
        return max(0.0, self.table.original_ms - self.table.dense_ms())

    def _compute(self, precision: str) -> str:
        return "dynamic" if self.compute == "dynamic" and precision == "int8" else "float"

    def layer_ms(self, sp: LayerSpace, r: int | None) -> float:
        """The predicted time of layer ``sp.name`` at rank ``r`` (``None``: dense) in its
        space's form and precision."""
        return self._layer_ms(sp.name, sp.form, sp.precision, sp.residual_precision, r)

    def _layer_ms(self, name: str, form: str, precision: str, residual_precision: str, r: int | None) -> float:
        if r is None:
            return self.table.product_ms(name, "dense", self._compute(precision), None)
        total = 0.0
        for shape, role in form_of(form).products():
            p = residual_precision if role == "W" else precision
            total += self.table.product_ms(name, shape, self._compute(p), r)
        return total

    def predict_plan(self, plan) -> float:
        """The predicted time (ms) of the model a factors file's plan (`Plan`) describes:
        what any plan, with or without a latency budget, is predicted to take on the table's
        engine."""
        return self.rest_ms + math.fsum(
            self._layer_ms(n, i.form, i.precision, i.residual_precision, None if i.dense else i.rank)
            for n, i in plan.layers.items())

    def predict(self, spaces: dict[str, LayerSpace], alloc: Alloc) -> float:
        """The whole model's predicted time (ms) with ``alloc`` in ``spaces``."""
        return self.rest_ms + math.fsum(self.layer_ms(spaces[n], r) for n, r in alloc.items())

    def within(self, spaces: dict[str, LayerSpace], alloc: Alloc) -> bool:
        return self.predict(spaces, alloc) <= self.limit_ms

    def record(self, spaces: dict[str, LayerSpace], alloc: Alloc) -> dict:
        """What the plan records (``plan.latency``)."""
        t = self.table
        return {"asked": self.asked, "budget_ms": round(self.limit_ms, 4), "batch": t.batch,
                "predicted_ms": round(self.predict(spaces, alloc), 4), "original_ms": round(t.original_ms, 4),
                "rest_ms": round(self.rest_ms, 4), "compute": self.compute, "engine": t.engine,
                "table_sha256": t.sha256,
                "layers_ms": {n: round(self.layer_ms(spaces[n], r), 4) for n, r in alloc.items()}}

    def infeasible(self, what: str) -> MixrankError:
        return MixrankError(
            f"no allocation meets the latency budget of {self.limit_ms:.3f} ms ({self.asked}) at batch "
            f"{self.table.batch}: {what}; the original takes {self.table.original_ms:.3f} ms, of which "
            f"{self.rest_ms:.3f} ms outside the selected layers; raise --latency or lower min_rank")
