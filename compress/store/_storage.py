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

How each layer form (a factor pair, or a pair's layer with one factor and an index)
names its tensors is the form's own (`mixrank.compress.factor.forms`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._quant import INT_BITS, QTensor, quantize, rebalance


def _gram(H: torch.Tensor | None, quantizer: str) -> torch.Tensor | None:
    return H if quantizer == "gptq" else None


class StoredFactors(NamedTuple):
    """Factors as stored: the tensors for the factors file by role suffix (``"A"``,
    ``"A.codes"``, ...), and A and B as the engine reads them back (float32)."""

    tensors: dict[str, torch.Tensor]
    A: torch.Tensor
    B: torch.Tensor


def store_pair(A: torch.Tensor, B: torch.Tensor, precision: str, quant, G: torch.Tensor | None = None
               ) -> StoredFactors:
    """Store a factor pair ``A`` (m, r), ``B`` (r, n) at ``precision``.

    Integer precisions first rescale the pair (``quant.split``), then quantize ``B``
    (input Gram ``G``) and ``A`` (its input is ``B x``, Gram ``B̂ G B̂ᵀ`` with the stored
    ``B̂``), with GPTQ or round-to-nearest (``quant.quantizer``).

    Args:
        A, B: the factors (float).
        precision: ``fp32``, ``fp16``, ``int8`` or ``int4``.
        quant: the `Quantize` settings (``split``, ``block``, ``quantizer``, ``scheme``).
        G: the layer's input Gram matrix (GPTQ); ``None``: round to nearest.

    Returns:
        `StoredFactors`, the read-back factors float32 on the inputs' device.
    """
    if precision == "fp32":
        return StoredFactors({"A": A.float(), "B": B.float()}, A.float(), B.float())
    if precision == "fp16":
        Ah, Bh = A.half(), B.half()
        return StoredFactors({"A": Ah, "B": Bh}, Ah.float(), Bh.float())
    bits = INT_BITS[precision]
    A, B = rebalance(A, B, quant.split)
    G = None if G is None else G.to(B.device)
    sym = quant.scheme == "symmetric"
    qB = quantize(B, bits, quant.block, _gram(G, quant.quantizer), symmetric=sym, grid=quant.grid)
    Bd = qB.dequantize()
    HA = None if G is None else Bd.double() @ G.double() @ Bd.double().T
    qA = quantize(A, bits, quant.block, _gram(HA, quant.quantizer), symmetric=sym, grid=quant.grid)
    return StoredFactors({**qtensor_tensors("A", qA), **qtensor_tensors("B", qB)}, qA.dequantize(), Bd)


def store_weight(W: torch.Tensor, precision: str, quant, G: torch.Tensor | None = None, role: str = "W",
                 block: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Store a weight ``W`` (N, K) at ``precision`` under ``role`` (``{}`` for a dense
    layer's ``W`` at fp32: the graph keeps the original), integer blocks of ``block``
    (``None``: ``quant.block``). Returns (tensors by role suffix, W read back)."""
    if precision == "fp32":
        return ({} if role == "W" else {role: W.float()}), W.float()
    if precision == "fp16":
        Wh = W.half()
        return {role: Wh}, Wh.float()
    qW = quantize(W, INT_BITS[precision], block or quant.block,
                  _gram(None if G is None else G.to(W.device), quant.quantizer),
                  symmetric=quant.scheme == "symmetric", grid=quant.grid)
    return qtensor_tensors(role, qW), qW.dequantize()


def qtensor_tensors(role: str, q: QTensor) -> dict[str, torch.Tensor]:
    """The factors file's tensors of ``q`` stored under ``role`` (``codes``, ``scale``,
    ``zero_point``)."""
    return {f"{role}.codes": q.codes, f"{role}.scale": q.scale, f"{role}.zero_point": q.zero_point}


def stored_qtensor(tensors: dict[str, torch.Tensor], key: str, k: int, precision: str) -> QTensor:
    """The `QTensor` stored in ``tensors`` (a factors file's) under ``key``
    (``"<layer>.A"``) at integer ``precision``, with reduction length ``k``."""
    return QTensor(tensors[f"{key}.codes"], tensors[f"{key}.scale"], tensors[f"{key}.zero_point"], k,
                   INT_BITS[precision])


def read_back(tensors: dict[str, torch.Tensor], key: str, k: int, precision: str) -> torch.Tensor:
    """The float32 values stored in ``tensors`` under ``key`` at ``precision`` (reduction
    length ``k``), read back exactly as the engine reads them."""
    if precision in ("fp32", "fp16"):
        return tensors[key].float()
    return stored_qtensor(tensors, key, k, precision).dequantize()
