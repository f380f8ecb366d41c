"""The sparse term (`SPARSE`): a residual correction whose support an engine can run,
``channel`` (whole input columns) or ``row`` (k entries per output row). Adding a
structure is a module here plus its import below (docs/design.md, "Adding a sparse
structure")."""

from ._base import (
           INDEX_BYTES,
           SPARSE,
           SparseStructure,
           SparseTerm,
           damped,
           fit_sparse,
           fit_values,
           largest_k,
           sparse_cost,
)
from ._channel import ChannelSparse
from ._row import RowSparse
