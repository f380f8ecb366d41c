"""Mixed-rank allocation under one global budget, judged end to end: each layer's space of
choices (`LayerSpace`), the uniform allocation, the search, and the allocators
(`ALLOCATORS`: uniform, search). Adding one: docs/design.md, "Adding an allocator"."""

from ._allocators import (
    ALLOCATORS,
    AUTO_PRECISIONS,
    Allocation,
    Allocator,
    DenseAllocator,
    SearchAllocator,
    SpacesAt,
    UniformAllocator,
)
from ._choices import DENSE_OPTIONS, FACTOR_PRECISIONS, RESIDUAL_OPTIONS, LayerChoices
from ._latency import COMPUTES, TABLE_FORMAT, LatencyBudget, LatencyTable, parse_latency
from ._mixed import MixedPlan, Option, mixed_allocation, propose, sensitivities
from ._search import layer_groups, search_allocation, with_partners
from ._spaces import Alloc, Candidate, LayerSpace, alloc_cost, feasible_range, layer_spaces
from ._uniform import fill_budget, step_rank, uniform_allocation, uniform_within
