"""Allocators (`ALLOCATORS`): a rank (or dense) per layer, and with ``precision="auto"`` a
storage precision, under one global budget, judged end to end (docs/design.md,
"Mixed-rank allocation"; adding one: "Adding an allocator")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixrank.core import MixrankError, Registry

from .._limits import Deadline
from ._mixed import mixed_allocation
from ._search import search_allocation
from ._spaces import Alloc, Candidate, LayerSpace, alloc_cost
from ._uniform import uniform_within

if TYPE_CHECKING:  # annotations only: the configuration imports the allocators' registry
    from .._config import CompressConfig

SpacesAt = Callable[[str, bool], "dict[str, LayerSpace]"]  # (precision, pairs in their forms) -> the spaces
AUTO_PRECISIONS = ("fp16", "int8", "int4")


def auto_precisions(quantize) -> tuple[str, ...]:
    """The uniform precisions ``precision="auto"`` starts from: `AUTO_PRECISIONS` within the
    configuration's integer ``widths``."""
    return tuple(p for p in AUTO_PRECISIONS if quantize.allows(p))


@dataclass
class Allocation:
    """An allocator's result.

    Attributes:
        ranks: a rank per layer (``None``: dense).
        spaces: the spaces it was chosen in (their ``precision`` and ``form`` are each
            layer's storage and form).
        candidates: every `Candidate` scored (the first is the uniform allocation, or the
            families `Allocator.start` compared).
        stopped: why the search stopped (``"uniform"`` when there was none).
        family: the start chosen: ``"uniform"``, ``"uniform pairs"``, ``"uniform int8"``,
            ``"dense int8 (quantization alone)"``, ...
    """

    ranks: Alloc
    spaces: dict[str, LayerSpace]
    candidates: list[Candidate]
    stopped: str
    family: str = "uniform"

    @property
    def precisions(self) -> dict[str, str]:
        return {n: sp.precision for n, sp in self.spaces.items()}

    @property
    def forms(self) -> dict[str, str]:
        return {n: sp.form for n, sp in self.spaces.items()}


class Allocator:
    """Interface: choose a rank (or dense) per layer, and with ``precision="auto"`` a
    storage precision, under the budget.

    Attributes:
        settings: the `CompressConfig` settings it reads (``"search.rounds"``, ...).
    """

    name: str = ""
    settings: tuple[str, ...] = ()

    def allocate(self, spaces_at: SpacesAt, budget: int, config: CompressConfig, evaluator,
                 progress: bool = True, deadline: Deadline | None = None, latency=None) -> Allocation:
        """Choose the allocation.

        Args:
            spaces_at: ``spaces_at(precision, paired)`` builds the layers' spaces
                (``paired``: the model's pairs in their pairwise forms).
            budget: in the spaces' unit.
            config: the `CompressConfig`.
            evaluator: ``evaluator(ranks)`` scores an allocation at the precisions and forms
                ``evaluator.use(spaces)`` set (`mixrank.compress.score.Evaluator`).
            progress: show progress bars.
            deadline: the wall-clock cap, if any.
            latency: a `LatencyBudget` the allocation meets too (``None``: none).
        """
        raise NotImplementedError

    def start(self, spaces_at: SpacesAt, budget: int, config: CompressConfig, evaluator, latency=None
              ) -> tuple[Allocation, list[Candidate]]:
        """The uniform allocation at the configured precision, or with ``"auto"`` the best
        of the uniform allocations at each precision and of every layer dense at each
        precision (quantization alone) that fits the budget; each uniform allocation
        with the model's pairs in their pairwise forms too, unless the structure is fixed
        (``selection.structure``). Returns (the best, every family scored).

        Raises:
            MixrankError: no family meets the budget (or the latency budget).
        """
        families = self.families(spaces_at, budget, config, evaluator, latency)
        if latency is not None:
            fast = [f for f in families if latency.within(f[1], f[2])]
            if not fast:
                best = min(latency.predict(f[1], f[2]) for f in families)
                raise latency.infeasible(f"the fastest start is predicted at {best:.3f} ms")
            families = fast
        scored = []
        for name, spaces, ranks in families:
            evaluator.use(spaces)
            cost = alloc_cost(spaces, ranks)
            precision = "mixed" if name.startswith("mixed") else spaces and next(iter(spaces.values())).precision
            scored.append(Candidate(name, evaluator(ranks), cost, ranks=dict(ranks), cost=cost, precision=precision))
        best = min(range(len(scored)), key=lambda i: scored[i].score)
        name, spaces, ranks = families[best]
        evaluator.use(spaces)
        return Allocation(ranks, spaces, scored, "uniform", name), scored

    def families(self, spaces_at: SpacesAt, budget: int, config: CompressConfig, evaluator, latency=None
                 ) -> list[tuple[str, dict, Alloc]]:
        """(name, spaces, ranks) of every starting point `start` scores (`_families`)."""
        return _families(spaces_at, budget, config, latency=latency)


def _families(spaces_at: SpacesAt, budget: int, config: CompressConfig, strict: bool = True, latency=None
              ) -> list[tuple[str, dict, Alloc]]:
    """(name, spaces, ranks) of every starting family that meets the budget (`Allocator.start`);
    ``strict``: none is an error (else the caller adds its own families first). Under a
    latency budget a uniform family takes the largest ranks that meet it
    (`uniform_within`); one whose smallest ranks are too slow is left out."""
    step = config.selection.rank_step
    storage = config.precision
    structures = {"auto": (False, True), "lowrank": (False,), "pairs": (True,)}[config.structure]
    families = []
    for p in (auto_precisions(config.quantize) if storage == "auto" else (storage,)):
        for paired in structures:
            spaces = spaces_at(p, paired)
            if paired and all(sp.form == "lowrank" for sp in spaces.values()):
                continue  # no pairs in this model
            try:
                ranks = uniform_within(spaces, budget, step, latency)
            except MixrankError:
                if storage != "auto" and not (paired and len(structures) > 1) and latency is None:
                    raise
                continue  # this precision cannot meet the budget at any rank
            name = "uniform" if storage != "auto" else f"uniform {p}"
            families.append((name + (" pairs" if paired else ""), spaces, ranks))
    if storage == "auto":
        for p in auto_precisions(config.quantize):
            spaces = spaces_at(p, False)
            ranks = {n: None for n in spaces}
            if alloc_cost(spaces, ranks) <= budget:
                families.append((f"dense {p} (quantization alone)", spaces, ranks))
    if strict and not families:
        raise MixrankError(f"no precision meets the budget of {budget:,} bytes for the selected layers "
                           "even at the lowest rank; raise the budget or lower min_rank")
    return families


ALLOCATORS: Registry[Allocator] = Registry("allocator")


@ALLOCATORS.register("uniform")
class UniformAllocator(Allocator):
    """Every layer keeps the same fraction of its parameters (`uniform_allocation`)."""

    def allocate(self, spaces_at, budget, config, evaluator, progress=True, deadline=None, latency=None):
        return self.start(spaces_at, budget, config, evaluator, latency)[0]


@ALLOCATORS.register("search")
class SearchAllocator(Allocator):
    """Rank moved between layers from the uniform start, judged end to end
    (`search_allocation`), at the best precision family of `Allocator.start`."""

    settings = ("search.rounds", "search.evals", "search.seconds", "search.groups", "search.role_scales",
                "search.forms")

    def families(self, spaces_at, budget, config, evaluator, latency=None):
        """`Allocator.families`, and with ``precision="auto"`` the best allocation over every
        form per layer (`mixed_allocation`), when ``spaces_at`` can list the options."""
        families = _families(spaces_at, budget, config, strict=not hasattr(spaces_at, "options") and latency is None,
                             latency=latency)
        if config.precision == "auto" and hasattr(spaces_at, "options"):
            def score(spaces: dict, ranks: Alloc) -> float:
                evaluator.use(spaces)
                return evaluator(ranks)

            reference = spaces_at("fp32", unit="bytes")
            for plan, _ in mixed_allocation(spaces_at.options(), budget, reference, score, latency)[:1]:
                families.append((plan.family(), plan.spaces, plan.ranks))
            # quantization alone at its best (each layer's width mixed) starts too: what method
            # "quantize" ships is then always a candidate, so the joint plan is never worse on the
            # held-out score (without it, MiniLM at 0.1123x shipped 0.9613 where it has 0.9647)
            families += _dense_mixed(spaces_at, budget, score, latency)
        if not families:
            if latency is not None:
                raise latency.infeasible("no precision and form meets both budgets")
            raise MixrankError(f"no precision meets the budget of {budget:,} bytes for the selected layers "
                               "even at the lowest rank; raise the budget or lower min_rank")
        return families

    def allocate(self, spaces_at, budget, config, evaluator, progress=True, deadline=None, latency=None):
        best, families = self.start(spaces_at, budget, config, evaluator, latency)
        if all(r is None or not best.spaces[n].free for n, r in best.ranks.items()):
            return best  # quantization alone (or every rank fixed) won: nothing to move rank between
        s = config.search
        seconds = s.seconds if deadline is None else deadline.cap(s.seconds, share=0.4)
        start = best.ranks if best.family.startswith("mixed") else None
        ranks, cands, stop = search_allocation(best.spaces, budget, config.selection.rank_step, evaluator,
                                               s.rounds, max(1, s.evals - len(families) + 1), seconds,
                                               progress=progress, groups=s.groups, role_scales=s.role_scales,
                                               start=start, latency=latency)
        if deadline is not None:
            deadline.note("search", stop == "seconds")
        if len(families) > 1:  # the search's own uniform start is the chosen family
            cands = [*families, *cands[1:]]
        return Allocation(ranks, best.spaces, cands, stop, best.family)


@ALLOCATORS.register("dense")
class DenseAllocator(Allocator):
    """Quantization alone, at its best: every layer dense, each at the integer width and
    block the allocation over every form chooses for it (`mixed_allocation` over the dense
    options), beside every layer at one precision; the best end to end ships. Needs a bytes
    budget (``precision="auto"``)."""

    settings = ("search.forms",)

    def families(self, spaces_at, budget, config, evaluator, latency=None):
        if config.precision != "auto" or not hasattr(spaces_at, "options"):
            raise MixrankError("quantization alone (method 'quantize') chooses each layer's integer width under a "
                               "bytes budget: give bytes= (and no precision, or precision='auto')")
        families = []
        for p in config.quantize.widths:
            spaces = spaces_at(p, False)
            ranks = {n: None for n in spaces}
            if alloc_cost(spaces, ranks) <= budget:
                families.append((f"dense {p} (quantization alone)", spaces, ranks))

        def score(spaces: dict, ranks: Alloc) -> float:
            evaluator.use(spaces)
            return evaluator(ranks)

        families += _dense_mixed(spaces_at, budget, score, latency)
        if not families:
            raise MixrankError(f"no integer width fits the budget of {budget:,} bytes with every layer dense; "
                               "raise the budget")
        return families

    def allocate(self, spaces_at, budget, config, evaluator, progress=True, deadline=None, latency=None):
        return self.start(spaces_at, budget, config, evaluator, latency)[0]


def _dense_mixed(spaces_at, budget: int, score, latency=None) -> list[tuple]:
    """The family of quantization alone at its best: every layer dense, each at the width and
    block that `mixed_allocation` over the dense options chooses (none when none fits)."""
    dense = {n: [o for o in opts if o.rank is None] for n, opts in spaces_at.options(("dense",)).items()}
    return [(plan.family() + " (quantization alone)", plan.spaces, plan.ranks)
            for plan, _ in mixed_allocation(dense, budget, spaces_at("fp32", unit="bytes"), score, latency)[:1]]
