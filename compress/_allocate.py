"""Mixed-rank allocation under a global parameter budget, judged end to end.

A layer is either dense (rank ``None``, cost ``m·n``) or factored at rank ``r``
(cost ``r·(m+n)``). The uniform allocation gives every layer the same fraction of
its parameters. The search starts there and moves rank between layers; each
candidate is scored by the whole model's output error against the original on
held-out calibration batches, and only a measured improvement is accepted, so the
result is never worse than uniform (docs/design.md, "Mixed-rank allocation").

Allocators are registered in `ALLOCATORS` (``uniform``, ``search``); adding one:
docs/design.md, "Adding an allocator".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from ._errors import MixrankError
from ._registry import Registry

Alloc = dict[str, "int | None"]  # layer -> rank, None = dense


@dataclass
class LayerSpace:
    """The choices of one layer: ranks ``floor, floor+step, ..., cap`` or dense."""

    name: str
    m: int
    n: int
    floor: int
    cap: int  # largest rank (multiple of step) with r(m+n) < mn
    step: int = 8
    fixed: int | None = None  # a fixed rank from an override
    dense: bool = False  # forced dense (override, or no rank saves parameters)

    @property
    def free(self) -> bool:
        return not self.dense and self.fixed is None

    def cost(self, r: int | None) -> int:
        return self.m * self.n if r is None else r * (self.m + self.n)


def layer_spaces(
    shapes: dict[str, tuple[int, int]], step: int, min_rank: int, overrides: dict[str, dict]
) -> dict[str, LayerSpace]:
    spaces = {}
    for name, (m, n) in shapes.items():
        ov = overrides.get(name, {})
        limit = (m * n - 1) // (m + n)  # largest r with r(m+n) < mn
        cap = (limit // step) * step
        floor = max(min_rank, ov.get("min_rank", 0))
        floor = int(math.ceil(floor / step) * step)
        sp = LayerSpace(name, m, n, floor, cap, step)
        if ov.get("dense"):
            sp.dense = True
        elif "rank" in ov:
            if ov["rank"] > limit:
                raise MixrankError(
                    f"override {name!r}: rank {ov['rank']} saves no parameters for a {m}x{n} "
                    f"layer (max useful rank {limit}); use dense=True instead"
                )
            sp.fixed = int(ov["rank"])
        elif cap < floor:
            sp.dense = True  # too small for any rank >= floor to save parameters
        spaces[name] = sp
    return spaces


def alloc_cost(spaces: dict[str, LayerSpace], alloc: Alloc) -> int:
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


def _fill(spaces: dict[str, LayerSpace], alloc: Alloc, budget: int, order: list[str]) -> Alloc:
    """Spend leftover budget one rank step at a time on free layers, in ``order``
    (repeated), until no step fits."""
    alloc = dict(alloc)
    left = budget - alloc_cost(spaces, alloc)
    progress = True
    while progress:
        progress = False
        for name in order:
            sp = spaces[name]
            r = alloc[name]
            if not sp.free or r is None:
                continue
            step_rank = _next_rank(sp, r)
            if step_rank is None:
                continue
            extra = sp.cost(step_rank) - sp.cost(r)
            if extra <= left:
                alloc[name] = step_rank
                left -= extra
                progress = True
    return alloc


def _next_rank(sp: LayerSpace, r: int) -> int | None:
    return r + sp.step if r + sp.step <= sp.cap else None


def uniform_allocation(spaces: dict[str, LayerSpace], budget: int, step: int) -> Alloc:
    """Every free layer keeps the same fraction ``f`` of its parameters
    (``r = f·mn/(m+n)`` rounded down to ``step``), ``f`` as large as the budget
    allows; then leftover budget is spent a step at a time on the layers furthest
    below the common fraction.

    Raises:
        MixrankError: the budget is outside the feasible range (the range is named).
    """
    lo, hi = feasible_range(spaces)
    total = sum(sp.m * sp.n for sp in spaces.values())
    if budget < lo or budget >= total:
        raise MixrankError(
            f"budget of {budget:,} parameters is outside the feasible range [{lo:,}, {total:,}) "
            f"for the selected layers (keep in [{lo / total:.4f}, 1)); lower min_rank to allow a smaller budget"
        )

    def at(f: float) -> Alloc:
        alloc: Alloc = {}
        for name, sp in spaces.items():
            if sp.dense:
                alloc[name] = None
            elif sp.fixed is not None:
                alloc[name] = sp.fixed
            else:
                r = int(f * sp.m * sp.n / (sp.m + sp.n)) // step * step
                alloc[name] = min(max(r, sp.floor), sp.cap)
        return alloc

    a, b = 0.0, 1.0
    for _ in range(60):
        mid = (a + b) / 2
        if alloc_cost(spaces, at(mid)) <= budget:
            a = mid
        else:
            b = mid
    alloc = at(a)
    frac = {n: spaces[n].cost(r) / (spaces[n].m * spaces[n].n) for n, r in alloc.items()
            if r is not None}
    order = sorted(frac, key=frac.get)
    return _fill(spaces, alloc, budget, order)


def search_allocation(
    spaces: dict[str, LayerSpace],
    budget: int,
    step: int,
    score: Callable[[Alloc], float],
    rounds: int,
    max_evals: int,
    max_seconds: float | None = None,
    progress: bool = True,
) -> tuple[Alloc, list[dict], str]:
    """Move rank between layers from the uniform start, accepting only measured gains.

    Each round probes every free layer one step down and one step up (end-to-end
    score per parameter moved), then tries moves that give steps to the layers
    whose extra rank helped most per parameter, paid for by the layers whose lost
    rank hurt least per parameter. The best move is accepted if it lowers the
    score; otherwise the search stops.

    Returns:
        (allocation, candidates, stop reason): candidates is the list of every
        allocation scored, each a dict with ``name``, ``score``, ``params`` and either
        ``ranks`` (full) or ``base`` + ``delta`` (rank changes against a named
        allocation); the stop reason is ``"converged"``, ``"rounds"``, ``"evals"`` or
        ``"seconds"``.
    """
    alloc = uniform_allocation(spaces, budget, step)
    evals = [0]
    t0 = time.perf_counter()

    def out_of_time(fraction: float = 1.0) -> bool:
        return max_seconds is not None and time.perf_counter() - t0 > fraction * max_seconds

    bar = tqdm(total=max_evals, desc="allocate", unit="eval", disable=not progress)

    def scored(a: Alloc) -> float:
        s = score(a)
        evals[0] += 1
        bar.update(1)
        return s

    best = scored(alloc)
    current = "uniform"
    cands = [{"name": "uniform", "score": best, "params": alloc_cost(spaces, alloc),
              "ranks": dict(alloc)}]
    free = [n for n, sp in spaces.items() if sp.free]

    def delta(a: Alloc) -> dict[str, int]:
        return {n: (a[n] or 0) - (alloc[n] or 0) for n in a if a[n] != alloc[n]}

    stop = "rounds"
    for rnd in range(1, rounds + 1):
        if evals[0] + 2 * len(free) + 1 > max_evals:
            stop = "evals"
            break
        if out_of_time(0.8):
            stop = "seconds"
            break
        up, down = {}, {}
        for name in free:
            if out_of_time(0.8):  # keep a fifth of the time for the moves
                stop = "seconds"
                break
            sp, r = spaces[name], alloc[name]
            per = step * (sp.m + sp.n)
            if r - step >= sp.floor:
                a = {**alloc, name: r - step}
                s = scored(a)
                cands.append({"name": f"r{rnd}.probe", "score": s, "params": alloc_cost(spaces, a),
                              "base": current, "delta": delta(a)})
                down[name] = (s - best) / per
            if r + step <= sp.cap:
                a = {**alloc, name: r + step}
                s = scored(a)
                cands.append({"name": f"r{rnd}.probe", "score": s, "params": alloc_cost(spaces, a),
                              "base": current, "delta": delta(a)})
                up[name] = (best - s) / per
        receivers = [n for n in sorted(up, key=up.get, reverse=True) if up[n] > 0]
        donors = sorted(down, key=down.get)
        proposals = []
        for k in (1, 2, 4, 8, 16):
            if k > len(receivers):
                break
            a = dict(alloc)
            for n in receivers[:k]:
                a[n] += step
            for n in donors:
                if alloc_cost(spaces, a) <= budget:
                    break
                if n in receivers[:k]:
                    continue
                a[n] -= step
            if alloc_cost(spaces, a) > budget:
                continue
            a = _fill(spaces, a, budget, receivers + [n for n in free if n not in receivers])
            if a != alloc and a not in proposals:
                proposals.append(a)
        best_prop, best_s = None, best
        for i, a in enumerate(proposals):
            if evals[0] >= max_evals or out_of_time():
                break
            s = scored(a)
            cands.append({"name": f"r{rnd}.move{i}", "score": s, "params": alloc_cost(spaces, a),
                          "base": current, "delta": delta(a)})
            if s < best_s:
                best_prop, best_s = a, s
        if best_prop is None:
            if stop == "rounds":
                stop = "converged"
            break
        alloc, best = best_prop, best_s
        current = f"r{rnd}.accepted"
        cands.append({"name": current, "score": best, "params": alloc_cost(spaces, alloc),
                      "ranks": dict(alloc)})
    bar.close()
    return alloc, cands, stop


class Allocator:
    """Interface: choose a rank (or dense) per layer under the budget.

    Attributes:
        settings: the `CompressConfig` settings it reads (``"search.rounds"``, ...).
    """

    name: str = ""
    settings: tuple[str, ...] = ()

    def allocate(self, spaces: dict[str, LayerSpace], budget: int, config, score: Callable[[Alloc], float],
                 progress: bool = True) -> tuple[Alloc, list[dict], str]:
        """Returns (allocation, candidates scored, stop reason); the first candidate is
        the uniform allocation."""
        raise NotImplementedError


ALLOCATORS: Registry[Allocator] = Registry("allocator")


@ALLOCATORS.register("uniform")
class UniformAllocator(Allocator):
    """Every layer keeps the same fraction of its parameters (`uniform_allocation`)."""

    def allocate(self, spaces, budget, config, score, progress=True):
        alloc = uniform_allocation(spaces, budget, config.selection.rank_step)
        cands = [{"name": "uniform", "score": score(alloc), "params": alloc_cost(spaces, alloc),
                  "ranks": dict(alloc)}]
        return alloc, cands, "uniform"


@ALLOCATORS.register("search")
class SearchAllocator(Allocator):
    """Rank moved between layers from the uniform start, judged end to end
    (`search_allocation`)."""

    settings = ("search.rounds", "search.evals", "search.seconds")

    def allocate(self, spaces, budget, config, score, progress=True):
        s = config.search
        return search_allocation(spaces, budget, config.selection.rank_step, score, s.rounds, s.evals,
                                 s.seconds, progress=progress)
