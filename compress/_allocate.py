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
from ._quant import storage_bytes
from ._registry import Registry

Alloc = dict[str, "int | None"]  # layer -> rank, None = dense


@dataclass
class LayerSpace:
    """The choices of one layer: ranks ``floor, floor+step, ..., cap`` or dense, at one
    storage ``precision``. ``cost`` is in the budget's ``unit``: parameters, or bytes as
    the exporter stores them (integer blocks padded, scales and zero points included)."""

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
    form: str = "lowrank"  # or a pair's "rows" / "cols" (mixrank.compress._pairs): one factor plus an index
    bias_delta: bool = False  # a pair's layer that stores a new bias (m values)
    tie: str | None = None  # the pair's other layer: both always have the same rank

    @property
    def free(self) -> bool:
        return not self.dense and self.fixed is None

    def extra(self, r: int) -> int:
        """What a pair's form adds to its factor at rank ``r``, in 4-byte values as the
        exporter writes them: ``rows`` an int32 index and a float32 mask over the m outputs
        (Gather, Mul), ``cols`` the r int32 indices of the inputs it reads (Gather), and the
        bias delta (m floats) where there is one."""
        if self.form == "lowrank":
            return 0
        return (2 * self.m if self.form == "rows" else r) + (self.m if self.bias_delta else 0)

    def cost(self, r: int | None) -> int:
        """The cost of rank ``r`` (``None``: dense) in the budget's unit."""
        if self.unit == "params":
            if r is None:
                return self.m * self.n
            if self.form == "rows":
                return r * self.n + self.extra(r)
            if self.form == "cols":
                return self.m * r + self.extra(r)
            return r * (self.m + self.n)
        return self.stored_bytes(r)

    def stored_bytes(self, r: int | None) -> int:
        """Bytes as the exporter stores rank ``r`` (``None``: dense) at this precision."""
        m, n, p, b, s = self.m, self.n, self.precision, self.block, self.symmetric
        if r is None:
            return storage_bytes(m, n, p, b, s)
        if self.form == "rows":  # B (r, n) over n, plus `extra`
            return storage_bytes(r, n, p, b, s) + 4 * self.extra(r)
        if self.form == "cols":  # A (m, r) over r
            return storage_bytes(m, r, p, b, s) + 4 * self.extra(r)
        return storage_bytes(r, n, p, b, s) + storage_bytes(m, r, p, b, s)  # B (r, n) over n; A (m, r) over r

    def value_cost(self, r: int | None, value_bytes: int) -> int:
        """The cost in values of ``value_bytes`` (what a sparse term's size is counted in)."""
        return self.cost(r) if self.unit == "params" else self.cost(r) // value_bytes


def layer_spaces(
    shapes: dict[str, tuple[int, int]], step: int, min_rank: int, overrides: dict[str, dict],
    unit: str = "params", precision: str = "fp32", block: int = 32, symmetric: bool = False,
    forms: dict[str, tuple[str, bool, str, int]] | None = None,
) -> dict[str, LayerSpace]:
    """Each layer's space of ranks; ``forms`` gives a pair's layers their form:
    layer → (form, stores a bias delta, the other layer, the largest size the pair has)."""
    spaces = {}
    forms = forms or {}
    for name, (m, n) in shapes.items():
        ov = overrides.get(name, {})
        form, delta, tie, size = forms.get(name, ("lowrank", False, None, 0))
        sp = LayerSpace(name, m, n, 0, 0, step, unit=unit, precision=precision, block=block, symmetric=symmetric,
                        form=form, bias_delta=delta, tie=tie)
        dense_cost = sp.cost(None)
        limit = (m * n - 1) // (m + n) if form == "lowrank" else size  # largest r with r(m+n) < mn
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


def per_rank(sp: LayerSpace) -> int:
    """Parameters one unit of rank costs (a ``cols`` form's index entry included)."""
    return {"lowrank": sp.m + sp.n, "rows": sp.n, "cols": sp.m + 1}[sp.form]


def _step(spaces: dict[str, LayerSpace], alloc: Alloc, name: str, sign: int) -> Alloc | None:
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
            a = _step(spaces, alloc, name, +1)
            if a is None:
                continue
            extra = alloc_cost(spaces, a) - alloc_cost(spaces, alloc)
            if extra <= left:
                alloc = a
                left -= extra
                progress = True
    return alloc


def uniform_allocation(spaces: dict[str, LayerSpace], budget: int, step: int,
                       weights: dict[str, float] | None = None) -> Alloc:
    """Every free layer keeps the same fraction ``f`` of its parameters
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
                r = int(min(f * w, 1.0) * sp.m * sp.n / per_rank(sp)) // step * step
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
    return _fill(spaces, alloc, budget, order)


def layer_groups(names: list[str], parts: int) -> list[list[str]]:
    """Layers grouped by role and depth: the same qualified name up to the block index
    (``blocks.*.mlp.fc1``) in the same one of ``parts`` equal spans of the depth."""
    import re

    index = {n: int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))}
    depth = max(index.values(), default=0) + 1
    groups: dict[tuple, list[str]] = {}
    for n in names:
        role = re.sub(r"\.\d+\.", ".*.", n, count=1)
        span = index[n] * parts // depth if n in index else 0
        groups.setdefault((role, span), []).append(n)
    return list(groups.values())


def _with_partners(units: list[list[str]], spaces: dict[str, LayerSpace]) -> list[list[str]]:
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
) -> tuple[Alloc, list[dict], str]:
    """Move rank between layers from the uniform start, accepting only measured gains.

    First (``role_scales``), coarse moves between roles: for each role (a layer's name up
    to its block index, with its pair's other layer), the uniform solve with that role's
    fraction scaled by each factor and the others' fraction what the budget leaves; the
    best such start is kept if it beats uniform, and the roles are probed once more from
    there (two passes). On a pretrained encoder the roles differ far more than rank steps
    of 8 can move in a few rounds (MiniLM at keep 0.6: value/output wanted twice the
    query/key's fraction).

    Each round probes every unit — a free layer, or with ``groups`` > 0 a group of layers
    of one role in one of ``groups`` spans of the depth (`layer_groups`) — one rank step
    down and one step up (end-to-end score per unit of cost moved), then tries moves
    that give steps to the units whose extra rank helped most per unit of cost, paid for
    by the units whose lost rank hurt least. The best move is accepted if it lowers the
    score; otherwise the search stops. Groups make a round cost a few dozen evaluations
    on a deep model instead of two per layer.

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
    units = _with_partners(layer_groups(free, groups) if groups else [[n] for n in free], spaces)

    def delta(a: Alloc) -> dict[str, int]:
        return {n: (a[n] or 0) - (alloc[n] or 0) for n in a if a[n] != alloc[n]}

    def shifted(base: Alloc, unit: list[str], sign: int) -> Alloc | None:
        """``base`` with every layer of ``unit`` that can move one step in ``sign`` (a pair's
        two layers are in the same unit and move together)."""
        a = dict(base)
        for n in unit:
            r = a[n] + sign * step
            if spaces[n].floor <= r <= spaces[n].cap:
                a[n] = r
        return a if a != base else None

    if role_scales:
        roles = _with_partners(layer_groups(free, 1), spaces)
        weights: dict[str, float] = {}
        for rnd in range(2):
            found = None
            for unit in roles:
                for scale in role_scales:
                    if evals[0] >= max_evals // 2 or out_of_time(0.3):
                        break
                    w = {**weights, **{n: weights.get(n, 1.0) * scale for n in unit}}
                    try:
                        a = uniform_allocation(spaces, budget, step, w)
                    except MixrankError:
                        continue
                    if a == alloc:
                        continue
                    s = scored(a)
                    cands.append({"name": f"roles{rnd + 1}.probe", "score": s, "params": alloc_cost(spaces, a),
                                  "base": current, "delta": delta(a), "scale": scale, "role": unit[0]})
                    if s < (best if found is None else found[0]):
                        found = (s, a, w)
            if found is None:
                break
            best, alloc, weights = found
            current = f"roles{rnd + 1}.accepted"
            cands.append({"name": current, "score": best, "params": alloc_cost(spaces, alloc), "ranks": dict(alloc)})
    stop = "rounds"
    for rnd in range(1, rounds + 1):
        if hasattr(score, "set_base"):  # probes then re-run only from the block they change
            score.set_base(alloc)
        if evals[0] + 2 * len(units) + 1 > max_evals:
            stop = "evals"
            break
        if out_of_time(0.8):
            stop = "seconds"
            break
        up, down = {}, {}
        for u, unit in enumerate(units):
            if out_of_time(0.8):  # keep a fifth of the time for the moves
                stop = "seconds"
                break
            a = shifted(alloc, unit, -1)
            if a is not None:
                s = scored(a)
                cands.append({"name": f"r{rnd}.probe", "score": s, "params": alloc_cost(spaces, a),
                              "base": current, "delta": delta(a)})
                down[u] = (s - best) / max(alloc_cost(spaces, alloc) - alloc_cost(spaces, a), 1)
            a = shifted(alloc, unit, +1)
            if a is not None:
                s = scored(a)
                cands.append({"name": f"r{rnd}.probe", "score": s, "params": alloc_cost(spaces, a),
                              "base": current, "delta": delta(a)})
                up[u] = (best - s) / max(alloc_cost(spaces, a) - alloc_cost(spaces, alloc), 1)
        receivers = [u for u in sorted(up, key=up.get, reverse=True) if up[u] > 0]
        donors = sorted(down, key=down.get)
        proposals = []
        for k in (1, 2, 4, 8, 16):
            if k > len(receivers):
                break
            a = dict(alloc)
            for u in receivers[:k]:
                a = shifted(a, units[u], +1) or a
            for u in donors:
                if alloc_cost(spaces, a) <= budget:
                    break
                if u in receivers[:k]:
                    continue
                a = shifted(a, units[u], -1) or a
            if alloc_cost(spaces, a) > budget:
                continue
            order = [n for u in receivers for n in units[u]]
            a = _fill(spaces, a, budget, order + [n for n in free if n not in order])
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


@dataclass
class Allocation:
    """An allocator's result: a rank (``None``: dense) per layer, the spaces it was chosen
    in (their ``precision`` is each layer's storage), every candidate scored (the first is
    the uniform allocation), and why the search stopped."""

    ranks: Alloc
    spaces: dict[str, LayerSpace]
    candidates: list[dict]
    stopped: str
    family: str = "uniform"  # the start chosen: "uniform", "uniform pairs", "uniform int8", "dense int8 (...)"

    @property
    def precisions(self) -> dict[str, str]:
        return {n: sp.precision for n, sp in self.spaces.items()}

    @property
    def forms(self) -> dict[str, str]:
        return {n: sp.form for n, sp in self.spaces.items()}


SpacesAt = Callable[[str, bool], "dict[str, LayerSpace]"]  # (precision, pairs in their forms) -> the spaces
AUTO_PRECISIONS = ("fp16", "int8", "int4")


class Allocator:
    """Interface: choose a rank (or dense) per layer, and with ``precision="auto"`` a
    storage precision, under the budget.

    Attributes:
        settings: the `CompressConfig` settings it reads (``"search.rounds"``, ...).
    """

    name: str = ""
    settings: tuple[str, ...] = ()

    def allocate(self, spaces_at: SpacesAt, budget: int, config, evaluator, progress: bool = True,
                 deadline=None) -> Allocation:
        """``spaces_at(precision, paired)`` builds the layers' spaces (``paired``: the
        model's pairs in their pairwise forms); ``evaluator(ranks)`` scores an allocation
        at the precisions and forms ``evaluator.use(spaces)`` set; ``deadline`` is the
        `Deadline` (if any)."""
        raise NotImplementedError

    def start(self, spaces_at: SpacesAt, budget: int, config, evaluator) -> tuple[Allocation, list[dict]]:
        """The uniform allocation at the configured precision, or with ``"auto"`` the best
        of the uniform allocations at each precision and of every layer dense at each
        precision (quantization alone) that fits the budget; each uniform allocation
        with the model's pairs in their pairwise forms too, unless the structure is fixed
        (``selection.structure``). Returns (the best, every family scored)."""
        step = config.selection.rank_step
        storage = config.storage
        structures = {"auto": (False, True), "lowrank": (False,), "pairs": (True,)}[config.structure]
        families = []
        for p in (AUTO_PRECISIONS if storage == "auto" else (storage,)):
            for paired in structures:
                spaces = spaces_at(p, paired)
                if paired and all(sp.form == "lowrank" for sp in spaces.values()):
                    continue  # no pairs in this model
                try:
                    ranks = uniform_allocation(spaces, budget, step)
                except MixrankError:
                    if storage != "auto" and not (paired and len(structures) > 1):
                        raise
                    continue  # this precision cannot meet the budget at any rank
                name = "uniform" if storage != "auto" else f"uniform {p}"
                families.append((name + (" pairs" if paired else ""), spaces, ranks))
        if storage == "auto":
            for p in AUTO_PRECISIONS:
                spaces = spaces_at(p, False)
                ranks = {n: None for n in spaces}
                if alloc_cost(spaces, ranks) <= budget:
                    families.append((f"dense {p} (quantization alone)", spaces, ranks))
        if not families:
            raise MixrankError(f"no precision meets the budget of {budget:,} bytes for the selected layers "
                               "even at the lowest rank; raise the budget or lower min_rank")
        scored = []
        for name, spaces, ranks in families:
            evaluator.use(spaces)
            scored.append({"name": name, "score": evaluator(ranks), "cost": alloc_cost(spaces, ranks),
                           "params": alloc_cost(spaces, ranks), "ranks": dict(ranks),
                           "precision": spaces and next(iter(spaces.values())).precision})
        best = min(range(len(scored)), key=lambda i: scored[i]["score"])
        name, spaces, ranks = families[best]
        evaluator.use(spaces)
        return Allocation(ranks, spaces, scored, "uniform", name), scored


ALLOCATORS: Registry[Allocator] = Registry("allocator")


@ALLOCATORS.register("uniform")
class UniformAllocator(Allocator):
    """Every layer keeps the same fraction of its parameters (`uniform_allocation`)."""

    def allocate(self, spaces_at, budget, config, evaluator, progress=True, deadline=None):
        return self.start(spaces_at, budget, config, evaluator)[0]


@ALLOCATORS.register("search")
class SearchAllocator(Allocator):
    """Rank moved between layers from the uniform start, judged end to end
    (`search_allocation`), at the best precision family of `Allocator.start`."""

    settings = ("search.rounds", "search.evals", "search.seconds", "search.groups", "search.role_scales")

    def allocate(self, spaces_at, budget, config, evaluator, progress=True, deadline=None):
        best, families = self.start(spaces_at, budget, config, evaluator)
        if all(r is None for r in best.ranks.values()):
            return best  # quantization alone won: nothing to move rank between
        s = config.search
        seconds = s.seconds if deadline is None else deadline.cap(s.seconds, share=0.4)
        ranks, cands, stop = search_allocation(best.spaces, budget, config.selection.rank_step, evaluator,
                                               s.rounds, max(1, s.evals - len(families) + 1), seconds,
                                               progress=progress, groups=s.groups, role_scales=s.role_scales)
        if deadline is not None:
            deadline.note("search", stop == "seconds")
        if len(families) > 1:  # the search's own uniform start is the chosen family
            cands = [*families, *cands[1:]]
        return Allocation(ranks, best.spaces, cands, stop, best.family)
