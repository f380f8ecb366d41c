"""The uniform allocation: every free layer keeps the same fraction of its parameters,
as large as the budget allows (`uniform_allocation`)."""

from __future__ import annotations

from mixrank.core import MixrankError

from ._spaces import Alloc, LayerSpace, alloc_cost, feasible_range


def step_rank(spaces: dict[str, LayerSpace], alloc: Alloc, name: str, sign: int) -> Alloc | None:
    """``alloc`` with ``name`` (and the other layer of its pair) one rank step up or down,
    or ``None`` when that leaves the layer's grid."""
    sp = spaces[name]
    if not sp.free or alloc[name] is None:
        return None
    r = alloc[name] + sign * sp.step
    if not sp.floor <= r <= sp.cap:
        return None
    a = dict(alloc)
    a[name] = r
    if sp.tie is not None and sp.tie in a:
        a[sp.tie] = r
    return a


def fill_budget(spaces: dict[str, LayerSpace], alloc: Alloc, budget: int, order: list[str], ok=None) -> Alloc:
    """Spend leftover budget one rank step at a time on free layers, in ``order``
    (repeated), until no step fits (``ok(alloc)``: also a step's allocation must pass it,
    a latency budget's test)."""
    alloc = dict(alloc)
    left = budget - alloc_cost(spaces, alloc)
    progress = True
    while progress:
        progress = False
        for name in order:
            a = step_rank(spaces, alloc, name, +1)
            if a is None:
                continue
            extra = alloc_cost(spaces, a) - alloc_cost(spaces, alloc)
            if extra <= left and (ok is None or ok(a)):
                alloc = a
                left -= extra
                progress = True
    return alloc


def uniform_allocation(spaces: dict[str, LayerSpace], budget: int, step: int,
                       weights: dict[str, float] | None = None) -> Alloc:
    """Every free layer of ``spaces`` keeps the same fraction ``f`` of its parameters
    (``r = f·mn/(m+n)`` rounded down to ``step``), ``f`` as large as the budget
    allows; then leftover budget is spent a step at a time on the layers furthest
    below the common fraction. ``weights`` scale a layer's fraction (``w·f``; 1 where
    absent): the same solve with some roles given more of the budget than others.

    Raises:
        MixrankError: the budget is outside the feasible range (the range is named).
    """
    lo, hi = feasible_range(spaces)
    total = sum(sp.cost(None) for sp in spaces.values())
    if budget < lo or budget >= total:
        sp0 = next(iter(spaces.values()))
        what = "parameters" if sp0.unit == "params" else f"bytes at {sp0.precision}"
        frac = "keep" if sp0.unit == "params" else "fraction of these layers' bytes"
        raise MixrankError(
            f"budget of {budget:,} {what} is outside the feasible range [{lo:,}, {total:,}) "
            f"for the selected layers ({frac} in [{lo / total:.4f}, 1)); lower min_rank to allow a smaller budget"
        )

    def at(f: float) -> Alloc:
        alloc: Alloc = {}
        for name, sp in spaces.items():
            if sp.dense:
                alloc[name] = None
            elif sp.fixed is not None:
                alloc[name] = sp.fixed
            else:
                w = 1.0 if weights is None else weights.get(name, 1.0)
                r = int(min(f * w, 1.0) * sp.m * sp.n / sp.per_rank()) // step * step
                alloc[name] = min(max(r, sp.floor), sp.cap)
        for name, sp in spaces.items():  # a pair at the smaller of its two sizes
            if sp.tie is not None and alloc.get(name) is not None and alloc.get(sp.tie) is not None:
                alloc[name] = alloc[sp.tie] = min(alloc[name], alloc[sp.tie])
        return alloc

    a, b = 0.0, 1.0 / min([1.0, *(weights or {}).values()])
    for _ in range(60):
        mid = (a + b) / 2
        if alloc_cost(spaces, at(mid)) <= budget:
            a = mid
        else:
            b = mid
    alloc = at(a)
    frac = {n: spaces[n].cost(r) / spaces[n].cost(None) for n, r in alloc.items() if r is not None}
    order = sorted(frac, key=frac.get)
    return fill_budget(spaces, alloc, budget, order)


def uniform_within(spaces: dict[str, LayerSpace], budget: int, step: int, latency=None,
                   weights: dict[str, float] | None = None) -> Alloc:
    """`uniform_allocation` under ``budget``, and under a latency budget too (``latency``, a
    `LatencyBudget`): the uniform allocation of the largest byte budget up to ``budget``
    whose predicted time meets it (bisected).

    Raises:
        MixrankError: the byte budget is infeasible, or even the smallest ranks are too slow.
    """
    alloc = uniform_allocation(spaces, budget, step, weights)
    if latency is None or latency.within(spaces, alloc):
        return alloc
    lo, hi = feasible_range(spaces)[0], budget
    smallest = uniform_allocation(spaces, lo, step, weights)
    if not latency.within(spaces, smallest):
        precision = next(iter(spaces.values())).precision if spaces else ""
        raise latency.infeasible(f"every layer at its smallest rank at {precision} is predicted at "
                                 f"{latency.predict(spaces, smallest):.3f} ms")
    best = smallest
    for _ in range(40):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        a = uniform_allocation(spaces, mid, step, weights)
        if latency.within(spaces, a):
            lo, best = mid, a
        else:
            hi = mid
    return best
