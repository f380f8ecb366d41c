"""One allocation over every form, per layer (``precision="auto"``): each layer may be dense
at any integer width and block, factored at a rank and precision, or a low-rank term plus
a quantized residual (`Option`), all under one byte budget.

Proposal (MLoRQ, LQ-LoRA): each option's layer error as stored is measured once; a
layer's sensitivity is the whole model's held-out error with that layer alone at its
cheapest option, over that option's layer error, so that ``sensitivity × layer error``
estimates what an option costs the output; a Lagrangian over these rate–distortion curves
(one multiplier on bytes, bisected to the budget, the bytes left then spent greedily)
picks one option per layer. Acceptance (the search's rule): each proposal — one per
weighting of the sensitivities — is scored end to end on the held-out batches, and only
the best can start the rank search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ._spaces import Alloc, LayerSpace

EXPONENTS = (1.0, 0.5, 0.0)  # sensitivity ** e: measured, damped, ignored (the layer error alone)


@dataclass(frozen=True)
class Option:
    """One way to store a layer.

    Attributes:
        space: its `LayerSpace` (precision, form, block, residual storage).
        rank: the rank (``None``: dense).
        cost: its bytes as the exporter writes them.
        error: the layer NMSE of the option as stored, in the activation-aware metric.
        label: e.g. ``"dense int2 b128"``, ``"residual r8 fp16 + int2 b128"``.
        latency: its predicted time on the target (ms; 0 without a latency budget).
    """

    space: LayerSpace
    rank: int | None
    cost: int
    error: float
    label: str
    latency: float = 0.0


@dataclass
class MixedPlan:
    """A proposal: per layer its option, the layers' spaces and ranks, its bytes."""

    options: dict[str, Option]

    @property
    def spaces(self) -> dict[str, LayerSpace]:
        return {n: o.space for n, o in self.options.items()}

    @property
    def ranks(self) -> Alloc:
        return {n: o.rank for n, o in self.options.items()}

    @property
    def cost(self) -> int:
        return sum(o.cost for o in self.options.values())

    @property
    def latency(self) -> float:
        return sum(o.latency for o in self.options.values())

    def family(self) -> str:
        """``"mixed"`` and how many layers took each kind of option."""
        kinds: dict[str, int] = {}
        for o in self.options.values():
            kind = o.label.split(" r")[0] if o.rank is not None else o.label
            kinds[kind] = kinds.get(kind, 0) + 1
        return "mixed (" + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ")"


def sensitivities(options: dict[str, list[Option]], reference: dict[str, LayerSpace],
                  score: Callable[[dict, Alloc], float]) -> dict[str, float]:
    """Per layer: the held-out error of the model with that layer alone at its cheapest
    option (the others as ``reference``: float32, dense), over that option's layer error.
    ``score(spaces, ranks)`` scores an allocation end to end."""
    out = {}
    for name, opts in options.items():
        cheap = min(opts, key=lambda o: (o.cost, o.error))
        spaces = {**reference, name: cheap.space}
        ranks = {n: None for n in reference} | {name: cheap.rank}
        out[name] = max(score(spaces, ranks), 1e-15) / max(cheap.error, 1e-15)
    return out


def propose(options: dict[str, list[Option]], weight: dict[str, float], budget: int,
            limit: float | None = None) -> MixedPlan | None:
    """The option per layer minimising ``Σ weight · error + λ · bytes``, the multiplier
    bisected to the largest spending within ``budget``, the bytes left spent a step at a
    time on the upgrade that lowers the weighted error most per byte. ``None`` when even
    the cheapest options do not fit.

    With ``limit`` (the layers' predicted time, ms: a latency budget), ``+ μ · latency``
    too: μ is the least (bisected) whose plan meets ``limit`` once λ meets ``budget``, and
    the upgrades must fit both; ``None`` when no μ does."""
    if limit is None:
        chosen = _within_bytes(options, weight, budget, 0.0)
        return None if chosen is None else MixedPlan(_spend(options, chosen, weight, budget))

    def at(mu: float) -> dict[str, Option] | None:
        chosen = _within_bytes(options, weight, budget, mu)
        return chosen if chosen is not None and sum(o.latency for o in chosen.values()) <= limit else None

    if (chosen := at(0.0)) is None:
        lo, hi = 0.0, 1.0
        while (chosen := at(hi)) is None and hi < 1e30:
            hi *= 16.0
        if chosen is None:
            return None
        for _ in range(40):
            mid = (lo + hi) / 2
            if (found := at(mid)) is not None:
                hi, chosen = mid, found
            else:
                lo = mid
    return MixedPlan(_spend(options, chosen, weight, budget, limit))


def _within_bytes(options: dict[str, list[Option]], weight: dict[str, float], budget: int,
                  mu: float) -> dict[str, Option] | None:
    """The options minimising ``Σ weight · error + λ · bytes + mu · latency`` with λ the
    least (bisected) that meets ``budget``; the cheapest options when none does but they
    fit, ``None`` when not even they fit."""
    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts, key=lambda o: (weight[n] * o.error + lam * o.cost + mu * o.latency, o.cost))
                for n, opts in options.items()}

    cheapest = {n: min(opts, key=lambda o: (o.cost, o.error)) for n, opts in options.items()}
    if sum(o.cost for o in cheapest.values()) > budget:
        return None
    lo, hi = 0.0, 1.0
    while sum(o.cost for o in pick(hi).values()) > budget and hi < 1e30:
        hi *= 16.0
    for _ in range(100 if mu == 0 else 50):
        mid = (lo + hi) / 2
        if sum(o.cost for o in pick(mid).values()) <= budget:
            hi = mid
        else:
            lo = mid
    chosen = pick(hi)
    return cheapest if sum(o.cost for o in chosen.values()) > budget else chosen


def _spend(options: dict[str, list[Option]], chosen: dict[str, Option], weight: dict[str, float],
           budget: int, limit: float | None = None) -> dict[str, Option]:
    """Upgrades, best weighted gain per byte first, while any fits the bytes left (and the
    time left under ``limit``)."""
    chosen = dict(chosen)
    left = budget - sum(o.cost for o in chosen.values())
    slack = math.inf if limit is None else limit - sum(o.latency for o in chosen.values())
    while True:
        best, best_gain = None, 0.0
        for n, opts in options.items():
            now = chosen[n]
            for o in opts:
                extra = o.cost - now.cost
                gain = weight[n] * (now.error - o.error)
                if 0 <= extra <= left and gain > 0 and gain / max(extra, 1e-9) > best_gain \
                        and o.latency - now.latency <= slack:
                    best, best_gain = (n, o), gain / max(extra, 1e-9)
        if best is None:
            return chosen
        left -= best[1].cost - chosen[best[0]].cost
        slack -= best[1].latency - chosen[best[0]].latency
        chosen[best[0]] = best[1]


def mixed_allocation(options: dict[str, list[Option]], budget: int, reference: dict[str, LayerSpace],
                     score: Callable[[dict, Alloc], float], latency=None) -> list[tuple[MixedPlan, float]]:
    """Every proposal (one per exponent of the sensitivities, `EXPONENTS`) with its
    held-out score, best first; empty when no option set fits the budget (and the latency
    budget, ``latency``: a `LatencyBudget`, each option's time predicted by it)."""
    limit = None
    if latency is not None:
        options = {n: [replace(o, latency=latency.layer_ms(o.space, o.rank)) for o in opts]
                   for n, opts in options.items()}
        limit = latency.limit_ms - latency.rest_ms
    sens = sensitivities(options, reference, score)
    scored, seen = [], set()
    for e in EXPONENTS:
        plan = propose(options, {n: s ** e for n, s in sens.items()}, budget, limit)
        if plan is None:
            continue
        key = tuple(sorted((n, o.label) for n, o in plan.options.items()))
        if key in seen:
            continue
        seen.add(key)
        scored.append((plan, score(plan.spaces, plan.ranks)))
    return sorted(scored, key=lambda t: t[1])
