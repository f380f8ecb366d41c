"""Allocators (`ALLOCATORS`): a rank (or dense) per layer, and with ``precision="auto"`` a
storage precision, under one global budget, judged end to end (docs/design.md,
"Mixed-rank allocation"; adding one: "Adding an allocator")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixrank.core import MixrankError, Registry

from .._limits import Deadline
from ._search import search_allocation
from ._spaces import Alloc, Candidate, LayerSpace, alloc_cost
from ._uniform import uniform_allocation

if TYPE_CHECKING:  # annotations only: the configuration imports the allocators' registry
    from .._config import CompressConfig

SpacesAt = Callable[[str, bool], "dict[str, LayerSpace]"]  # (precision, pairs in their forms) -> the spaces
AUTO_PRECISIONS = ("fp16", "int8", "int4")


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
                 progress: bool = True, deadline: Deadline | None = None) -> Allocation:
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
        """
        raise NotImplementedError

    def start(self, spaces_at: SpacesAt, budget: int, config: CompressConfig, evaluator
              ) -> tuple[Allocation, list[Candidate]]:
        """The uniform allocation at the configured precision, or with ``"auto"`` the best
        of the uniform allocations at each precision and of every layer dense at each
        precision (quantization alone) that fits the budget; each uniform allocation
        with the model's pairs in their pairwise forms too, unless the structure is fixed
        (``selection.structure``). Returns (the best, every family scored).

        Raises:
            MixrankError: no family meets the budget.
        """
        families = _families(spaces_at, budget, config)
        scored = []
        for name, spaces, ranks in families:
            evaluator.use(spaces)
            cost = alloc_cost(spaces, ranks)
            scored.append(Candidate(name, evaluator(ranks), cost, ranks=dict(ranks), cost=cost,
                                    precision=spaces and next(iter(spaces.values())).precision))
        best = min(range(len(scored)), key=lambda i: scored[i].score)
        name, spaces, ranks = families[best]
        evaluator.use(spaces)
        return Allocation(ranks, spaces, scored, "uniform", name), scored


def _families(spaces_at: SpacesAt, budget: int, config: CompressConfig) -> list[tuple[str, dict, Alloc]]:
    """(name, spaces, ranks) of every starting family that meets the budget (`Allocator.start`)."""
    step = config.selection.rank_step
    storage = config.precision
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
    return families


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
