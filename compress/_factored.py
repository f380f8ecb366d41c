"""`FactoredLinear` and `apply_factors`: the factored PyTorch model."""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._errors import MixrankError
from ._factors import Factors, load_factors, weight_fingerprint
from ._sparse import SPARSE
from ._storage import read_back


class FactoredLinear(nn.Module):
    """``y = (x Bᵀ) Aᵀ + x Sᵀ + b``: a Linear layer as two thin matmuls plus a sparse
    path.

    Args:
        A: (out, rank) factor.
        B: (rank, in) factor.
        bias: (out,) or ``None``.
        sparse_structure: ``"none"`` or a registered structure (`SPARSE`) whose
            ``sparse_index`` and ``sparse_value`` (out, k) are given.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                 sparse_structure: str = "none", sparse_index: torch.Tensor | None = None,
                 sparse_value: torch.Tensor | None = None):
        super().__init__()
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"incompatible factors A{tuple(A.shape)} B{tuple(B.shape)}")
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features = B.shape[1]
        self.out_features = A.shape[0]
        self.sparse_structure = sparse_structure
        if sparse_structure != "none":
            self.register_buffer("sparse_index", sparse_index.detach().to(torch.int32).clone())
            self.sparse_value = nn.Parameter(sparse_value.detach().clone())
        else:
            self.sparse_index = None
            self.sparse_value = None

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    fake_quant: tuple | None = None  # (precision, Quantize): train through the stored rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.A, self.B
        if self.fake_quant is not None:
            from ._quant import rebalanced_ste

            A, B = rebalanced_ste(A, B, *self.fake_quant)
        y = F.linear(F.linear(x, B), A)  # (..., r) -> (..., m)
        if self.sparse_structure != "none":
            y = y + SPARSE[self.sparse_structure].apply(x, self.sparse_index.long(), self.sparse_value)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        sp = "" if self.sparse_structure == "none" else \
            f", sparse={self.sparse_structure}x{self.sparse_value.shape[1]}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}{sp}"


def factored_from_fit(fit, lin: nn.Module) -> FactoredLinear:
    """A `FactoredLinear` holding a `LayerFit`'s factors, on ``lin``'s device and dtype,
    with ``lin``'s bias."""
    w, sp = lin.weight, fit.sparse
    return FactoredLinear(fit.A.to(w), fit.B.to(w), lin.bias, "none" if sp is None else sp.structure,
                          None if sp is None else sp.index.to(w.device),
                          None if sp is None else sp.value.to(w))


def fit_from_factored(mod: FactoredLinear, old):
    """The `LayerFit` of ``mod``'s current values (CPU float32; the sparse support, NMSE
    and history from ``old``)."""
    from ._fit import LayerFit

    sp = old.sparse
    if sp is not None:
        sp = type(sp)(sp.structure, sp.index, mod.sparse_value.detach().cpu().float())
    return LayerFit(mod.A.detach().cpu().float(), mod.B.detach().cpu().float(), sp, old.nmse, old.history)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_factors(
    model: nn.Module, factors: Factors | str | os.PathLike, inplace: bool = False
) -> nn.Module:
    """Replace each factored Linear of ``model`` by a `FactoredLinear`, and give each layer
    kept dense at a reduced precision its weight as stored; stored values are read back
    exactly as the engine reads them (`read_back`).

    Args:
        model: the original model (the one the factors were computed from).
        factors: a `Factors` or a factors file path.
        inplace: modify ``model`` itself; by default a deep copy is modified.

    Returns:
        The factored model.

    Raises:
        MixrankError: a layer is missing, has another shape, or its weight is not
            the one the factors were computed from (a file for another model).
    """
    if not isinstance(factors, Factors):
        factors = load_factors(factors)
    modules = dict(model.named_modules())
    stored_dense = [n for n, i in factors.layers.items() if i.dense and i.precision != "fp32"]
    problems = []
    for name in [*factors.factored_layers(), *stored_dense]:
        info = factors.layers[name]
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            problems.append(f"{name}: no such nn.Linear in {type(model).__name__}")
        elif list(mod.weight.shape) != list(info.shape):
            problems.append(f"{name}: weight shape {list(mod.weight.shape)} != {info.shape}")
        elif weight_fingerprint(mod.weight) != info.sha256:
            problems.append(f"{name}: weight differs from the one the factors were computed from")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MixrankError(
            "these factors do not belong to this model: " + "; ".join(problems[:5]) + more
        )
    out = model if inplace else copy.deepcopy(model)
    t = factors.tensors
    for name in stored_dense:
        lin, info = out.get_submodule(name), factors.layers[name]
        with torch.no_grad():
            lin.weight.copy_(read_back(t, f"{name}.W", info.shape[1], info.precision))
    for name in factors.factored_layers():
        lin, info = out.get_submodule(name), factors.layers[name]
        dev, dt = lin.weight.device, lin.weight.dtype
        A = read_back(t, f"{name}.A", info.rank, info.precision).to(dev, dt)
        B = read_back(t, f"{name}.B", info.shape[1], info.precision).to(dev, dt)
        structure = info.sparse.structure
        if structure != "none":
            idx = factors.tensors[f"{name}.sparse_index"].to(dev)
            val = factors.tensors[f"{name}.sparse_value"].to(dev, dt)
            _set_module(out, name, FactoredLinear(A, B, lin.bias, structure, idx, val))
        else:
            _set_module(out, name, FactoredLinear(A, B, lin.bias))
    return out
