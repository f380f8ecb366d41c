"""How a layer's weights are stored at a precision, and read back.

One place turns a factor pair (or a dense weight) into what the factors file holds —
float32 or float16 tensors, or integer codes, scales and zero points — and into the
float32 values the model computes with after reading them back. The allocator's
simulation, the refinements' guard, the shipped factors, `apply_factors` and the
exporter all go through it, so what is scored is what is shipped (docs/design.md,
"Precision").

Tensor names in the factors file, for a layer ``<name>`` and a role ``A``, ``B`` (the
factors) or ``W`` (a dense layer stored at a reduced precision): ``<name>.<role>`` for
float32/float16, or ``<name>.<role>.codes`` (uint8, one code per byte, (N, blocks,
block)), ``<name>.<role>.scale`` (float32, (N, blocks)) and ``<name>.<role>.zero_point``
(uint8, (N, blocks)) for int8/int4, with N the output rows and K = the role's
reduction axis: n for ``B`` and ``W``, the rank for ``A``.

A layer of a pair (`mixrank.compress._pairs`) stores one factor: ``B`` for the form
``rows``, ``A`` for ``cols``, under the same names, plus ``<name>.index`` (int32, the kept
output rows or input columns) and, where its bias changes, ``<name>.bias_delta``
(float32, (m,), added to the original bias).
"""

from __future__ import annotations

import torch

from ._quant import INT_BITS, QTensor, quantize, rebalance


def _gram(H: torch.Tensor | None, quantizer: str) -> torch.Tensor | None:
    return H if quantizer == "gptq" else None


def store_pair(A: torch.Tensor, B: torch.Tensor, precision: str, quant, G: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Store a factor pair ``A`` (m, r), ``B`` (r, n) at ``precision``.

    Integer precisions first rescale the pair (``quant.split``), then quantize ``B``
    (input Gram ``G``) and ``A`` (its input is ``B x``, Gram ``B̂ G B̂ᵀ`` with the stored
    ``B̂``), with GPTQ or round-to-nearest (``quant.quantizer``).

    Returns:
        (tensors by role suffix — ``"A"``, ``"A.codes"``, ... —, A read back, B read back),
        the read-back factors float32 on the inputs' device.
    """
    if precision == "fp32":
        return {"A": A.float(), "B": B.float()}, A.float(), B.float()
    if precision == "fp16":
        Ah, Bh = A.half(), B.half()
        return {"A": Ah, "B": Bh}, Ah.float(), Bh.float()
    bits = INT_BITS[precision]
    A, B = rebalance(A, B, quant.split)
    G = None if G is None else G.to(B.device)
    sym = quant.scheme == "symmetric"
    qB = quantize(B, bits, quant.block, _gram(G, quant.quantizer), symmetric=sym)
    Bd = qB.dequantize()
    HA = None if G is None else Bd.double() @ G.double() @ Bd.double().T
    qA = quantize(A, bits, quant.block, _gram(HA, quant.quantizer), symmetric=sym)
    return {**_qt("A", qA), **_qt("B", qB)}, qA.dequantize(), Bd


def store_weight(W: torch.Tensor, precision: str, quant, G: torch.Tensor | None = None, role: str = "W"
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Store a weight ``W`` (N, K) at ``precision`` under ``role`` (``{}`` for a dense
    layer's ``W`` at fp32: the graph keeps the original). Returns (tensors by role suffix,
    W read back)."""
    if precision == "fp32":
        return ({} if role == "W" else {role: W.float()}), W.float()
    if precision == "fp16":
        Wh = W.half()
        return {role: Wh}, Wh.float()
    qW = quantize(W, INT_BITS[precision], quant.block, _gram(None if G is None else G.to(W.device),
                                                              quant.quantizer),
                  symmetric=quant.scheme == "symmetric")
    return _qt(role, qW), qW.dequantize()


def store_form(fit, precision: str, quant, G: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Store a pair's layer (form ``rows`` or ``cols``): its one factor at ``precision``
    (``B`` over the layer's inputs, Gram ``G``; ``A`` over the kept columns, Gram
    ``G[idx, idx]``), the index and the bias delta. Returns (tensors by suffix, A read
    back, B read back), the selection factor as given."""
    idx = fit.index.long()
    if fit.form == "rows":
        stored, B = store_weight(fit.B, precision, quant, G, role="B")
        A = fit.A
    else:
        Gs = None if G is None else G.to(idx.device)[idx][:, idx]
        stored, A = store_weight(fit.A, precision, quant, Gs, role="A")
        B = fit.B
    stored["index"] = fit.index.to(torch.int32)
    if fit.bias is not None:
        stored["bias_delta"] = fit.bias.float()
    return stored, A.float(), B.float()


def _qt(role: str, q: QTensor) -> dict[str, torch.Tensor]:
    return {f"{role}.codes": q.codes, f"{role}.scale": q.scale, f"{role}.zero_point": q.zero_point}


def stored_qtensor(tensors: dict[str, torch.Tensor], key: str, k: int, precision: str) -> QTensor:
    """The `QTensor` stored under ``key`` (``"<layer>.A"``) with reduction length ``k``."""
    return QTensor(tensors[f"{key}.codes"], tensors[f"{key}.scale"], tensors[f"{key}.zero_point"], k,
                   INT_BITS[precision])


def read_back(tensors: dict[str, torch.Tensor], key: str, k: int, precision: str) -> torch.Tensor:
    """The float32 values stored under ``key`` at ``precision`` (reduction length ``k``)."""
    if precision in ("fp32", "fp16"):
        return tensors[key].float()
    return stored_qtensor(tensors, key, k, precision).dequantize()


def selection(index: torch.Tensor, size: int, form: str) -> torch.Tensor:
    """The 0/1 selection factor of a pair's layer: (size, r) for ``rows`` (A: output row
    ``index[j]`` is component j), (r, size) for ``cols`` (B: component j reads input
    ``index[j]``)."""
    r = index.numel()
    idx = index.long()
    if form == "rows":
        E = torch.zeros(size, r)
        E[idx, torch.arange(r)] = 1.0
        return E
    E = torch.zeros(r, size)
    E[torch.arange(r), idx] = 1.0
    return E


def read_factors(tensors: dict[str, torch.Tensor], name: str, info) -> tuple[torch.Tensor, torch.Tensor]:
    """A factored layer's (A, B) as stored, float32 (a pair's selection as its 0/1 matrix).
    ``info`` is the layer's plan record."""
    m, n = info.shape
    form = info.form or "lowrank"
    if form == "lowrank":
        return (read_back(tensors, f"{name}.A", info.rank, info.precision),
                read_back(tensors, f"{name}.B", n, info.precision))
    idx = tensors[f"{name}.index"]
    if form == "rows":
        return selection(idx, m, "rows"), read_back(tensors, f"{name}.B", n, info.precision)
    return read_back(tensors, f"{name}.A", info.rank, info.precision), selection(idx, n, "cols")


def realize(fits: dict, dense: dict[str, str], precisions: dict[str, str], quant,
            grams: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Store every compressed layer at its precision.

    Args:
        fits: the factored layers' `LayerFit` (float32).
        dense: layer → precision of layers left dense but stored below fp32.
        precisions: layer → precision of the factored layers.
        grams, weights: each layer's input Gram matrix and original weight.

    Returns:
        (tensors for the factors file by full name, the factored layers' fits as read
        back, the dense layers' weights as read back).
    """
    from ._fit import LayerFit
    from ._sparse import SparseTerm

    tensors, read, read_dense = {}, {}, {}
    for name, f in fits.items():
        p = precisions.get(name, "fp32")
        if f.form != "lowrank":
            stored, A, B = store_form(f, p, quant, grams.get(name))
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in stored.items()})
            read[name] = f if p == "fp32" else f.replace(A=A.cpu(), B=B.cpu())
            continue
        stored, A, B = store_pair(f.A, f.B, p, quant, grams.get(name))
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in stored.items()})
        sp = f.sparse
        if sp is not None:
            value = sp.value.half() if p == "fp16" else sp.value.float()
            tensors[f"{name}.sparse_index"] = sp.index.detach().cpu().to(torch.int32).contiguous()
            tensors[f"{name}.sparse_value"] = value.detach().cpu().contiguous()
            sp = SparseTerm(sp.structure, sp.index, value.float())
        read[name] = f if p == "fp32" else LayerFit(A.cpu(), B.cpu(), sp, f.nmse, f.history)
    for name, p in dense.items():
        stored, W = store_weight(weights[name], p, quant, grams.get(name))
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in stored.items()})
        read_dense[name] = W
    return tensors, read, read_dense
