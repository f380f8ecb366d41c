"""`FactoredLinear` and `apply_factors`: the factored PyTorch model."""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from mixrank.core import MixrankError

from ..factor import FORMS, SPARSE, form_of
from ..store import dynamic_linear, per_channel_int8, read_back, stored_qtensor
from ._factors import Factors, load_factors, weight_fingerprint


class DynamicInt8Linear(nn.Module):
    """A dense Linear whose int8 weight runs as onnxruntime's dynamic int8 (`dynamic_linear`)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = codes.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dynamic_linear(x, self.codes, self.scale)
        return y if self.bias is None else y + self.bias


class FactoredLinear(nn.Module):
    """``y = (x Bᵀ) Aᵀ + x Sᵀ + b``: a Linear layer as two thin matmuls plus a sparse
    path; for a layer of a pair (`mixrank.compress.factor.pairs`) one of the two is a
    selection: form ``rows`` computes only the outputs ``index`` (``y[..., index] = x
    Bᵀ``, the others zero before the bias), form ``cols`` reads only the inputs ``index``
    (``y = x[..., index] Aᵀ``).

    Args:
        A: (out, rank) factor (for ``rows``: the selection, only its shape is used).
        B: (rank, in) factor (for ``cols``: the selection).
        bias: (out,) or ``None``: the original bias (a distillation keeps it).
        sparse_structure: ``"none"`` or a registered structure (`SPARSE`) whose
            ``sparse_index`` and ``sparse_value`` (out, k) are given.
        form: a registered layer form (`FORMS`: ``"lowrank"``, ``"rows"``, ``"cols"``); ``index``: (rank,) their rows or
            columns.
        bias_delta: (out,) added to the bias (a pair's new bias), or ``None``.
        residual: (out, in) the ``residual`` form's dense term (fixed: a buffer), or ``None``.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                 sparse_structure: str = "none", sparse_index: torch.Tensor | None = None,
                 sparse_value: torch.Tensor | None = None, form: str = "lowrank",
                 index: torch.Tensor | None = None, bias_delta: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None):
        super().__init__()
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"incompatible factors A{tuple(A.shape)} B{tuple(B.shape)}")
        if form not in FORMS or form_of(form).paired != (index is not None):
            raise ValueError(f"form {form!r} needs an index exactly when it is a pair's form")
        self.form = form
        trainable = form_of(form).trainable
        self.A = nn.Parameter(A.detach().clone()) if "A" in trainable else None
        self.B = nn.Parameter(B.detach().clone()) if "B" in trainable else None
        if index is not None:
            self.register_buffer("index", index.detach().to(device=B.device, dtype=torch.long).clone())
        else:
            self.index = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.bias_delta = None if bias_delta is None else nn.Parameter(bias_delta.detach().to(B).clone())
        if (form == "residual") != (residual is not None):
            raise ValueError("the residual form needs its dense term, and only it has one")
        if residual is not None:
            self.register_buffer("residual", residual.detach().to(B).clone())
        else:
            self.residual = None
        self.in_features = B.shape[1]
        self.out_features = A.shape[0]
        self._rank = B.shape[0]
        self.sparse_structure = sparse_structure
        if sparse_structure != "none":
            self.register_buffer("sparse_index", sparse_index.detach().to(torch.int32).clone())
            self.sparse_value = nn.Parameter(sparse_value.detach().clone())
        else:
            self.sparse_index = None
            self.sparse_value = None

    @property
    def rank(self) -> int:
        return self._rank

    fake_quant: tuple | None = None  # (precision, Quantize): train through the stored rounding
    # role ("A", "B", "W") -> (int8 codes, scales): those products computed as onnxruntime's dynamic int8 does
    # (`mixrank.compress.store.dynamic_linear`; `apply_factors(..., int_weights="dynamic")`)
    dynamic: dict | None = None

    def _linear(self, x: torch.Tensor, W: torch.Tensor, role: str) -> torch.Tensor:
        if role in self.dynamic:
            return dynamic_linear(x, *self.dynamic[role])
        return torch.nn.functional.linear(x, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.A, self.B
        if self.fake_quant is not None:
            A, B = form_of(self.form).straight_through(A, B, *self.fake_quant)
        y = form_of(self.form).forward(x, A, B, self.index, self.out_features, self.residual,
                                       **({"linear": self._linear} if self.dynamic else {}))  # (..., m)
        if self.sparse_structure != "none":
            y = y + SPARSE[self.sparse_structure].apply(x, self.sparse_index.long(), self.sparse_value)
        if self.bias_delta is not None:
            y = y + self.bias_delta
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        sp = "" if self.sparse_structure == "none" else \
            f", sparse={self.sparse_structure}x{self.sparse_value.shape[1]}"
        form = "" if self.form == "lowrank" else f", form={self.form}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}{form}{sp}"


def factored_from_fit(fit, lin: nn.Module) -> FactoredLinear:
    """A `FactoredLinear` holding a `LayerFit`'s factors, on ``lin``'s device and dtype,
    with ``lin``'s bias."""
    w, sp = lin.weight, fit.sparse
    return FactoredLinear(fit.A.to(w), fit.B.to(w), lin.bias, "none" if sp is None else sp.structure,
                          None if sp is None else sp.index.to(w.device),
                          None if sp is None else sp.value.to(w), fit.form,
                          None if fit.index is None else fit.index.to(w.device),
                          None if fit.bias is None else fit.bias.to(w),
                          None if fit.residual is None else fit.residual.dequantize().to(w))


def fit_from_factored(mod: FactoredLinear, old):
    """The `LayerFit` of ``mod``'s current values (CPU float32; the sparse support, the
    selection of a pair's layer, NMSE and history from ``old``)."""
    sp = old.sparse
    if sp is not None:
        sp = type(sp)(sp.structure, sp.index, mod.sparse_value.detach().cpu().float())
    A = old.A if mod.A is None else mod.A.detach().cpu().float()
    B = old.B if mod.B is None else mod.B.detach().cpu().float()
    bias = None if mod.bias_delta is None else mod.bias_delta.detach().cpu().float()
    return old.replace(A=A, B=B, sparse=sp, bias=bias)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_factors(
    model: nn.Module, factors: Factors | str | os.PathLike, inplace: bool = False, int_weights: str = "exact"
) -> nn.Module:
    """Replace each factored Linear of ``model`` by a `FactoredLinear`, and give each layer
    kept dense at a reduced precision its weight as stored; stored values are read back
    exactly as the engine reads them (`read_back`).

    Args:
        model: the original model (the one the factors were computed from).
        factors: a `Factors` or a factors file path.
        inplace: modify ``model`` itself; by default a deep copy is modified.
        int_weights: ``"exact"``: every weight as stored, what the ``packed`` and
            ``expanded`` artifacts compute; ``"dynamic"``: the int8-stored weights as the
            ``dynamic`` artifact computes them (requantized per channel, `per_channel_int8`,
            activations quantized per tensor, `dynamic_linear`).

    Returns:
        The factored model.

    Raises:
        MixrankError: a layer is missing, has another shape, or its weight is not
            the one the factors were computed from (a file for another model).
    """
    if int_weights not in ("exact", "dynamic"):
        raise MixrankError(f"int_weights is 'exact' or 'dynamic', got {int_weights!r}")
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
    dynamic = int_weights == "dynamic"

    def int8(key: str, k: int, precision: str, like: torch.Tensor):
        codes, scale = per_channel_int8(stored_qtensor(t, key, k, precision))
        return codes.to(like.device), scale.to(like.device, like.dtype)

    for name in stored_dense:
        lin, info = out.get_submodule(name), factors.layers[name]
        if dynamic and info.precision == "int8":
            set_module(out, name, DynamicInt8Linear(*int8(f"{name}.W", info.shape[1], "int8", lin.weight), lin.bias))
            continue
        with torch.no_grad():
            lin.weight.copy_(read_back(t, f"{name}.W", info.shape[1], info.precision))
    for name in factors.factored_layers():
        lin, info = out.get_submodule(name), factors.layers[name]
        dev, dt = lin.weight.device, lin.weight.dtype
        A, B = (f.to(dev, dt) for f in form_of(info.form).read(t, name, info))
        structure = info.sparse.structure
        idx = val = None
        if structure != "none":
            idx = factors.tensors[f"{name}.sparse_index"].to(dev)
            val = factors.tensors[f"{name}.sparse_value"].to(dev, dt)
        form = info.form or "lowrank"
        index = t[f"{name}.index"].to(dev) if form_of(form).paired else None
        bias = lin.bias
        delta = t.get(f"{name}.bias_delta")
        if delta is not None:  # a pair's new bias: one bias, as the engine adds it
            bias = delta.to(dev, dt) if bias is None else bias.detach() + delta.to(dev, dt)
        residual = form_of(form).read_residual(t, name, info)
        fl = FactoredLinear(A, B, bias, structure, idx, val, form, index,
                            residual=None if residual is None else residual.to(dev, dt))
        if dynamic:  # the roles stored at int8, with their reduction lengths
            roles = {"A": (info.rank, info.precision), "B": (info.shape[1], info.precision),
                     "W": (info.shape[1], info.residual_precision)}
            fl.dynamic = {role: int8(f"{name}.{role}", k, p, lin.weight) for role, (k, p) in roles.items()
                          if p == "int8" and f"{name}.{role}.codes" in t} or None
        set_module(out, name, fl)
    return out
