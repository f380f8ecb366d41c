"""The end-to-end allocation search: rank moved between layers from the uniform start,
each candidate scored by the whole model's output error on held-out batches, only a
measured improvement accepted, so the result is never worse than uniform
(docs/design.md, "Mixed-rank allocation")."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from mixrank.core import MixrankError

from ._spaces import Alloc, Candidate, LayerSpace, alloc_cost
from ._uniform import fill_budget, uniform_allocation, uniform_within


def layer_groups(names: list[str], parts: int) -> list[list[str]]:
    """Layers grouped by role and depth: the same qualified name up to the block index
    (``blocks.*.mlp.fc1``) in the same one of ``parts`` equal spans of the depth."""
    index = {n: int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))}
    depth = max(index.values(), default=0) + 1
    groups: dict[tuple, list[str]] = {}
    for n in names:
        role = re.sub(r"\.\d+\.", ".*.", n, count=1)
        span = index[n] * parts // depth if n in index else 0
        groups.setdefault((role, span), []).append(n)
    return list(groups.values())


def with_partners(units: list[list[str]], spaces: dict[str, LayerSpace]) -> list[list[str]]:
    """Each unit with the other layers of its pairs; units that become equal are merged."""
    out: list[list[str]] = []
    seen: set[tuple] = set()
    for unit in units:
        full = list(unit) + [spaces[n].tie for n in unit if spaces[n].tie is not None and spaces[n].tie not in unit]
        key = tuple(sorted(full))
        if key not in seen:
            seen.add(key)
            out.append(full)
    return out


def search_allocation(
    spaces: dict[str, LayerSpace],
    budget: int,
    step: int,
    score: Callable[[Alloc], float],
    rounds: int,
    max_evals: int,
    max_seconds: float | None = None,
    progress: bool = True,
    groups: int = 0,
    role_scales: tuple[float, ...] = (),
    start: Alloc | None = None,
    latency=None,
) -> tuple[Alloc, list[Candidate], str]:
    """Move rank between layers from the uniform start, accepting only measured gains.

    First (``role_scales``), coarse moves between roles: for each role (a layer's name up
    to its block index, with its pair's other layer), the uniform solve with that role's
    fraction scaled by each factor and the others' fraction what the budget leaves; the
    best such start is kept if it beats uniform, and the roles are probed once more from
    there (two passes): roles may want far more of the budget than rank steps can move in
    a few rounds.

    Each round probes every unit — a free layer, or with ``groups`` > 0 a group of layers
    of one role in one of ``groups`` spans of the depth (`layer_groups`) — one rank step
    down and one step up (end-to-end score per unit of cost moved), then tries moves
    that give steps to the units whose extra rank helped most per unit of cost, paid for
    by the units whose lost rank hurt least. The best move is accepted if it lowers the
    score; otherwise the search stops.

    Args:
        spaces: each layer's `LayerSpace`; budget: in their unit; step: the rank step.
        score: the held-out error of an allocation (with ``set_base``, it re-runs a probe
            only from the first block it changes).
        rounds, max_evals: at most this many rounds and evaluations.
        max_seconds: a wall-clock bound (``None``: none).
        progress: show a progress bar.
        groups, role_scales: see above (0 and ``()``: off).
        start: the allocation to start from (``None``: the uniform one).
        latency: a `LatencyBudget` every accepted allocation meets too (``None``: none);
            probes may exceed it, moves may not.

    Returns:
        (allocation, every `Candidate` scored — uniform first —, stop reason: ``"converged"``,
        ``"rounds"``, ``"evals"`` or ``"seconds"``).
    """
    search = _Search(spaces, budget, step, score, max_evals, max_seconds, progress, groups, start, latency)
    try:
        if role_scales:
            search.role_passes(role_scales)
        stop = search.rounds(rounds)
        return search.alloc, search.cands, stop
    finally:
        search.bar.close()


class _Search:
    """The state of one search: the current allocation and its score, every candidate
    scored, and the units whose rank moves together."""

    def __init__(self, spaces, budget, step, score, max_evals, max_seconds, progress, groups, start=None,
                 latency=None):
        self.spaces, self.budget, self.step, self.score = spaces, budget, step, score
        self.latency = latency
        self.max_evals, self.max_seconds = max_evals, max_seconds
        self.t0 = time.perf_counter()
        self.evals = 0
        self.bar = tqdm(total=max_evals, desc="allocate", unit="eval", disable=not progress)
        self.alloc = dict(start) if start is not None else uniform_within(spaces, budget, step, latency)
        self.best = self.scored(self.alloc)
        self.current = "uniform"
        self.cands = [Candidate("uniform", self.best, self.cost(self.alloc), ranks=dict(self.alloc))]
        self.free = [n for n, sp in spaces.items() if sp.free]
        self.units = with_partners(layer_groups(self.free, groups) if groups else [[n] for n in self.free], spaces)

    def out_of_time(self, fraction: float = 1.0) -> bool:
        return self.max_seconds is not None and time.perf_counter() - self.t0 > fraction * self.max_seconds

    def scored(self, a: Alloc) -> float:
        s = self.score(a)
        self.evals += 1
        self.bar.update(1)
        return s

    def cost(self, a: Alloc) -> int:
        return alloc_cost(self.spaces, a)

    def fast_enough(self, a: Alloc) -> bool:
        """Within the latency budget (always, without one)."""
        return self.latency is None or self.latency.within(self.spaces, a)

    def fits(self, a: Alloc) -> bool:
        """Within both budgets."""
        return self.cost(a) <= self.budget and self.fast_enough(a)

    def delta(self, a: Alloc) -> dict[str, int]:
        return {n: (a[n] or 0) - (self.alloc[n] or 0) for n in a if a[n] != self.alloc[n]}

    def probe(self, a: Alloc, name: str, **extra) -> float:
        """Score ``a`` and record it as a change of the current allocation."""
        s = self.scored(a)
        self.cands.append(Candidate(name, s, self.cost(a), base=self.current, delta=self.delta(a), **extra))
        return s

    def accept(self, a: Alloc, s: float, name: str) -> None:
        self.alloc, self.best, self.current = a, s, name
        self.cands.append(Candidate(name, s, self.cost(a), ranks=dict(a)))

    def shifted(self, base: Alloc, unit: list[str], sign: int) -> Alloc | None:
        """``base`` with every layer of ``unit`` that can move one step in ``sign`` (a pair's
        two layers are in the same unit and move together)."""
        a = dict(base)
        for n in unit:
            r = a[n] + sign * self.step
            if self.spaces[n].floor <= r <= self.spaces[n].cap:
                a[n] = r
        return a if a != base else None

    # ------------------------------------------------------------------ role scales

    def role_passes(self, role_scales: tuple[float, ...]) -> None:
        """Two passes of coarse moves between roles (see `search_allocation`)."""
        roles = with_partners(layer_groups(self.free, 1), self.spaces)
        weights: dict[str, float] = {}
        for rnd in range(2):
            found = self.role_pass(rnd, roles, role_scales, weights)
            if found is None:
                break
            s, a, weights = found
            self.accept(a, s, f"roles{rnd + 1}.accepted")

    def role_pass(self, rnd: int, roles: list[list[str]], role_scales: tuple[float, ...],
                  weights: dict[str, float]) -> tuple[float, Alloc, dict] | None:
        """The best start (score, allocation, weights) of one pass that beats the current
        one, or ``None``."""
        found = None
        for unit in roles:
            for scale in role_scales:
                if self.evals >= self.max_evals // 2 or self.out_of_time(0.3):
                    break
                w = {**weights, **{n: weights.get(n, 1.0) * scale for n in unit}}
                try:
                    a = uniform_allocation(self.spaces, self.budget, self.step, w)
                except MixrankError:
                    continue
                if a == self.alloc or not self.fast_enough(a):
                    continue
                s = self.probe(a, f"roles{rnd + 1}.probe", scale=scale, role=unit[0])
                if s < (self.best if found is None else found[0]):
                    found = (s, a, w)
        return found

    # ------------------------------------------------------------------ rounds

    def rounds(self, rounds: int) -> str:
        """Up to ``rounds`` rounds of probes and moves; returns the stop reason."""
        stop = "rounds"
        for rnd in range(1, rounds + 1):
            if hasattr(self.score, "set_base"):  # probes then re-run only from the block they change
                self.score.set_base(self.alloc)
            if self.evals + 2 * len(self.units) + 1 > self.max_evals:
                return "evals"
            if self.out_of_time(0.8):
                return "seconds"
            up, down, timed_out = self.probes(rnd)
            if timed_out:
                stop = "seconds"
            best = self.best_move(rnd, self.proposals(up, down))
            if best is None:
                return "converged" if stop == "rounds" else stop
            self.accept(best[0], best[1], f"r{rnd}.accepted")
        return stop

    def probes(self, rnd: int) -> tuple[dict[int, float], dict[int, float], bool]:
        """Every unit one step down and up: (gain per unit of cost of a step up, loss per
        unit of cost of a step down, whether time ran out first)."""
        up, down = {}, {}
        here = self.cost(self.alloc)
        for u, unit in enumerate(self.units):
            if self.out_of_time(0.8):  # keep a fifth of the time for the moves
                return up, down, True
            a = self.shifted(self.alloc, unit, -1)
            if a is not None:
                s = self.probe(a, f"r{rnd}.probe")
                down[u] = (s - self.best) / max(here - self.cost(a), 1)
            a = self.shifted(self.alloc, unit, +1)
            if a is not None:
                s = self.probe(a, f"r{rnd}.probe")
                up[u] = (self.best - s) / max(self.cost(a) - here, 1)
        return up, down, False

    def proposals(self, up: dict[int, float], down: dict[int, float]) -> list[Alloc]:
        """Moves giving a step to the 1, 2, 4, 8, 16 units that gained most, paid for by the
        units that lost least, the leftover budget then spent on the gainers first."""
        receivers = [u for u in sorted(up, key=up.get, reverse=True) if up[u] > 0]
        donors = sorted(down, key=down.get)
        out: list[Alloc] = []
        for k in (1, 2, 4, 8, 16):
            if k > len(receivers):
                break
            a = dict(self.alloc)
            for u in receivers[:k]:
                a = self.shifted(a, self.units[u], +1) or a
            for u in donors:
                if self.fits(a):
                    break
                if u in receivers[:k]:
                    continue
                a = self.shifted(a, self.units[u], -1) or a
            if not self.fits(a):
                continue
            order = [n for u in receivers for n in self.units[u]]
            a = fill_budget(self.spaces, a, self.budget, order + [n for n in self.free if n not in order],
                            ok=None if self.latency is None else self.fast_enough)
            if a != self.alloc and a not in out:
                out.append(a)
        return out

    def best_move(self, rnd: int, proposals: list[Alloc]) -> tuple[Alloc, float] | None:
        """The proposal that scores lowest, if it beats the current allocation."""
        best, best_s = None, self.best
        for i, a in enumerate(proposals):
            if self.evals >= self.max_evals or self.out_of_time():
                break
            s = self.probe(a, f"r{rnd}.move{i}")
            if s < best_s:
                best, best_s = a, s
        return None if best is None else (best, best_s)
