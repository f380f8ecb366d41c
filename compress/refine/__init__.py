"""Refinements after the closed form (`REFINEMENTS`), each proposing new fits that the
guarded step keeps only when they lower the held-out output error: ``sparse`` (a sparse
split), ``compensate`` (per-layer Adam), ``sequential`` (block-by-block refit and block
reconstruction), ``distill`` and ``qdistill`` (end-to-end distillation, the second through
the stored rounding). `descend` is the one Adam loop they share. Adding one is a module
here plus its import below (docs/design.md, "Adding a refinement")."""

from ._compensate import Compensate, compensate
from ._distill import CHUNK_TOKENS, Distill, QuantAwareDistill, distill
from ._guard import REFINEMENTS, Outcome, RefineContext, Refinement, RefineResult, Variant, run_refinements
from ._optim import Schedule, descend
from ._sequential import Sequential, sequential_refit
from ._sparse_split import SparseSplit, has_sparse_k, split_layer
