"""Mixed-rank allocation under a global parameter budget, judged end to end.

A layer is either dense (rank ``None``, cost ``m·n``) or factored at rank ``r``
(cost ``r·(m+n)``). The uniform allocation gives every layer the same fraction of
its parameters. The search starts there and moves rank between layers; each
candidate is scored by the whole model's output error against the original on
held-out calibration batches, and only a measured improvement is accepted, so the
result is never worse than uniform (DESIGN.md, "Mixed-rank allocation").
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._calibrate import move_batch, run_model
from ._errors import MixrankError
from ._factor import Spectrum

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


# ---------------------------------------------------------------- end-to-end scoring


def first_tensor(out) -> torch.Tensor:
    """The main output tensor of a model call (``logits`` of a dict/ModelOutput,
    the first element of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if "logits" in out:
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise MixrankError(f"cannot find an output tensor in a {type(out).__name__}")


def output_error(y: torch.Tensor, ref: torch.Tensor, metric: str) -> float:
    """Mean error of ``y`` against ``ref``: logits KL(ref‖y), normalised MSE or 1−cos
    (``"auto"`` is normalised MSE, see `CompressConfig.metric`)."""
    y, ref = y.double(), ref.double()
    if metric == "auto":
        metric = "mse"
    if metric == "kl":
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(y, -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())
    if metric == "mse":
        return float(((y - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-300))
    return float(1.0 - F.cosine_similarity(y.flatten(1), ref.flatten(1), dim=-1).mean())


class _SwitchLinear(nn.Module):
    """A Linear whose rank can be switched without rebuilding: ``rank=None`` is the
    dense weight, otherwise the first ``rank`` columns/rows of the cached factors."""

    def __init__(self, lin: nn.Linear, spec: Spectrum, cap: int):
        super().__init__()
        dev, dt = lin.weight.device, lin.weight.dtype
        self.weight = lin.weight
        self.bias = lin.bias
        self.us = spec.us[:, :cap].to(dev, dt)
        self.vt = spec.vt[:cap].to(dev, dt)
        self.rank: int | None = None
        self.fit: tuple | None = None  # (A, B, sparse) overriding the rank switch when set

    def set_fit(self, fit) -> None:
        """Use a `LayerFit`'s factors (``None`` returns to the rank switch)."""
        if fit is None:
            self.fit = None
            return
        dev, dt = self.weight.device, self.weight.dtype
        sp = fit.sparse
        if sp is not None:
            sp = type(sp)(sp.structure, sp.index.to(dev), sp.value.to(dev, dt))
        self.fit = (fit.A.to(dev, dt), fit.B.to(dev, dt), sp)

    def forward(self, x):
        if self.fit is not None:
            A, B, sp = self.fit
            y = F.linear(F.linear(x, B), A)
            if sp is not None:
                y = y + sp.apply(x)
            return y if self.bias is None else y + self.bias
        if self.rank is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(F.linear(x, self.vt[: self.rank]), self.us[:, : self.rank])
        return y if self.bias is None else y + self.bias


def _limit_samples(batches: list, max_samples: int | None) -> list:
    """The first ``max_samples`` samples of ``batches`` (the last batch cut short)."""
    from ._calibrate import batch_size, slice_batch

    if max_samples is None:
        return list(batches)
    out, left = [], max_samples
    for b in batches:
        if left <= 0:
            break
        n = batch_size(b)
        out.append(b if n <= left else slice_batch(b, 0, left, n))
        left -= n
    return out


class Evaluator:
    """Scores allocations by the whole model's output error on held-out batches.

    Holds one copy of the model whose selected Linear layers switch rank in place,
    and the original outputs of the held-out batches.
    """

    def __init__(self, model: nn.Module, spectra: dict[str, Spectrum],
                 spaces: dict[str, LayerSpace], batches: list, metric: str,
                 max_samples: int | None = None):
        self.model = copy.deepcopy(model).eval()
        self.device = next(self.model.parameters()).device
        self.batches = [move_batch(b, self.device) for b in _limit_samples(batches, max_samples)]
        self.metric = metric
        self.switches: dict[str, _SwitchLinear] = {}
        with torch.no_grad():
            self.refs = [first_tensor(run_model(self.model, b)).detach() for b in self.batches]
        for name, spec in spectra.items():
            cap = max(spaces[name].cap, spaces[name].fixed or 0)
            sw = _SwitchLinear(self.model.get_submodule(name), spec, cap)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, sw)
            self.switches[name] = sw
        self.cache: dict[tuple, float] = {}
        self.evals = 0

    def __call__(self, alloc: Alloc) -> float:
        key = tuple(sorted(alloc.items(), key=lambda kv: kv[0]))
        if key in self.cache:
            return self.cache[key]
        for name, r in alloc.items():
            self.switches[name].rank = r
        score = self._score()
        self.cache[key] = score
        self.evals += 1
        return score

    def score_fits(self, fits: dict) -> float:
        """Score explicit per-layer fits (layers absent from ``fits`` stay dense)."""
        for name, sw in self.switches.items():
            sw.rank = None
            sw.set_fit(fits.get(name))
        try:
            return self._score()
        finally:
            for sw in self.switches.values():
                sw.set_fit(None)

    def _score(self) -> float:
        errs, weights = [], []
        with torch.no_grad():
            for b, ref in zip(self.batches, self.refs, strict=True):
                y = first_tensor(run_model(self.model, b))
                errs.append(output_error(y, ref, self.metric))
                weights.append(ref.shape[0] if ref.ndim else 1)
        return sum(e * w for e, w in zip(errs, weights, strict=True)) / sum(weights)


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
