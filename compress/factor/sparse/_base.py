"""The sparse term: a residual correction ``S`` with a structure an engine can run.

A structure is a `SparseStructure` registered in `SPARSE` under the name users give
(``sparse="channel"``). It owns everything that depends on its shape: cost, support
choice, closed-form values, dense form, the PyTorch forward and the ONNX subgraph the
rewriter emits. Adding one touches its own module plus one import line in this package's
``__init__`` (docs/design.md, "Adding a sparse structure").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixrank.core import MixrankError, Registry

INDEX_BYTES = 4  # indices are stored as int32


class SparseStructure:
    """Interface of a sparse structure. ``index`` and ``value`` shapes are the
    structure's own; ``value`` always has ``m`` rows and ``k`` columns."""

    name: str = ""

    def index_count(self, k: int, m: int) -> int:
        """Number of stored int32 indices for size ``k`` on an ``m``-row layer."""
        raise NotImplementedError

    def cost(self, k: int, m: int, n: int, value_bytes: int = 4) -> int:
        """Parameter-equivalent cost: ``m·k`` values plus the index storage expressed in
        values of ``value_bytes``."""
        return m * k + math.ceil(self.index_count(k, m) * INDEX_BYTES / value_bytes)

    def support(self, R: torch.Tensor, G: torch.Tensor, k: int) -> torch.Tensor:
        """Choose the support of size ``k`` for the residual ``R`` (m, n) under ``G``."""
        raise NotImplementedError

    def fit_values(self, index: torch.Tensor, R: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
        """Closed-form values (float64, (m, k)) minimising ``tr((R−S) G (R−S)ᵀ)`` for a
        fixed support, ridge ``lam``."""
        raise NotImplementedError

    def dense(self, index: torch.Tensor, value: torch.Tensor, n: int) -> torch.Tensor:
        """The (m, n) matrix ``S``."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``x Sᵀ`` for x (..., n) → (..., m), touching only the support."""
        raise NotImplementedError

    def times(self, index: torch.Tensor, value: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """``S M`` for M (n, p), differentiable in ``value`` (compensation works in
        whitened coordinates, ``M = L``)."""
        return self.dense(index, value, M.shape[0]) @ M

    def emit_onnx(self, x, index, value, dtype, base: str, const_name, out_dtype):
        """The ONNX subgraph computing ``x Sᵀ`` (onnx-graphsurgeon objects).

        Args:
            x: the activation tensor (gs.Variable, (..., n)).
            index, value: numpy arrays of the factors file.
            dtype: numpy float dtype of the graph's weights.
            base: node-name prefix; const_name: ``const_name("sparse_value")`` names a
                constant uniquely in the graph.
            out_dtype: the output tensor's dtype.

        Returns:
            (nodes, output gs.Variable, number of weight values the constants hold).
        """
        raise NotImplementedError


SPARSE: Registry[SparseStructure] = Registry("sparse structure")


@dataclass
class SparseTerm:
    """A layer's sparse term: a registered ``structure`` with its ``index`` and ``value``
    (``value`` (m, k))."""

    structure: str
    index: torch.Tensor
    value: torch.Tensor

    @property
    def kind(self) -> SparseStructure:
        return SPARSE[self.structure]

    @property
    def k(self) -> int:
        return int(self.value.shape[1])

    def values(self) -> int:
        """Stored values."""
        return self.value.numel()

    def indices(self) -> int:
        """Stored int32 indices."""
        return self.index.numel()

    def dense(self, n: int) -> torch.Tensor:
        """The (m, n) matrix ``S`` of a layer with ``n`` inputs."""
        return self.kind.dense(self.index.long().to(self.value.device), self.value, n)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x Sᵀ`` for x (..., n) → (..., m)."""
        return self.kind.apply(x, self.index.long().to(x.device), self.value)


def sparse_cost(structure: str, k: int, m: int, n: int, value_bytes: int = 4) -> int:
    """Parameter-equivalent cost of a sparse term (0 for ``"none"`` or ``k == 0``)."""
    if structure == "none" or k == 0:
        return 0
    return SPARSE[structure].cost(k, m, n, value_bytes)


def largest_k(structure: str, budget: int, m: int, n: int, value_bytes: int = 4) -> int:
    """The largest sparse size whose cost fits in ``budget`` (at most ``n``)."""
    if structure == "none" or budget <= 0:
        return 0
    k = min(n, budget // m)
    while k > 0 and sparse_cost(structure, k, m, n, value_bytes) > budget:
        k -= 1
    return k


def damped(Gs: torch.Tensor, lam: float) -> torch.Tensor:
    """``Gs + λI`` on the last two dimensions."""
    eye = torch.eye(Gs.shape[-1], dtype=Gs.dtype, device=Gs.device)
    return Gs + lam * eye


def fit_values(structure: str, index: torch.Tensor, R: torch.Tensor, G: torch.Tensor,
               lam: float) -> torch.Tensor:
    """Closed-form values for a fixed support (float64)."""
    return SPARSE[structure].fit_values(index.long(), R.double(), G.double(), lam)


def fit_sparse(structure: str, k: int, R: torch.Tensor, G: torch.Tensor,
               lam: float) -> SparseTerm | None:
    """Choose a support of size ``k`` for the residual ``R`` (m, n) and fit its values."""
    if structure == "none" or k == 0:
        return None
    kind = SPARSE[structure]
    n = R.shape[1]
    if k > n:
        raise MixrankError(f"sparse size {k} is larger than the layer's {n} input channels")
    R, G = R.double(), G.double()
    index = kind.support(R, G, k)
    value = kind.fit_values(index.long(), R, G, lam)
    return SparseTerm(structure, index.to(torch.int32), value)
