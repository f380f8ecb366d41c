"""The ``residual`` form's fit: a low-rank term plus a block-quantized dense residual,
``W ≈ A B + Q``, both in the activation-aware metric ``tr(E G Eᵀ)`` (the seed paper's
"sum of two tensors"; CALDERA, QERA, SVDQuant).

Two starts are fitted and the better kept:

- low rank first (SVDQuant): ``A B`` the closed form of ``W`` (whitened SVD), ``Q`` GPTQ of
  ``W − Â B̂`` (the stored factors, so ``Q`` also absorbs their rounding);
- quantization first (QERA): ``Q`` GPTQ of ``W``, ``A B`` the closed form of ``W − Q`` (the
  output-error-optimal low-rank correction of the quantization error).

Then rounds of alternation (CALDERA): ``A B`` refit to ``W − Q``, ``Q`` requantized against
the new factors, each round kept only if the layer's error falls.
"""

from __future__ import annotations

import torch

from ..store import quantize, store_pair
from ._fit import LayerFit
from ._spectrum import Spectrum, whitened_spectrum

STARTS = ("lowrank", "quant")


def fit_residual(W: torch.Tensor, G: torch.Tensor, spec: Spectrum, rank: int, precision: str, bits: int,
                 block: int, quant, damping: float = 1e-2, rounds: int = 2) -> LayerFit:
    """The residual form of ``W`` (m, n) at ``rank``.

    Args:
        W, G: the weight and its input Gram matrix.
        spec: ``W``'s whitened spectrum (the low-rank-first start's closed form).
        rank: the low-rank term's rank; precision: its storage precision.
        bits, block: the dense residual's integer width and block.
        quant: the `Quantize` settings (quantizer, grid, scheme, split).
        damping: of ``G`` in the closed forms; rounds: of alternation after the better start.

    Returns:
        A `LayerFit` of form ``residual``: A, B (float32, as fitted: storing them at
        ``precision`` gives the factors ``Q`` was fitted against), ``residual`` = ``Q``,
        ``nmse`` of ``Â B̂ + Q̂`` (as stored), ``history`` its value per accepted step, and
        ``start`` naming the start that won.
    """
    Wd = W.detach().double().to(G.device)
    Gd = G.double()
    H = G if quant.quantizer == "gptq" else None
    sym = quant.scheme == "symmetric"

    def q_of(R: torch.Tensor):
        return quantize(R, bits, block, H, symmetric=sym, grid=quant.grid)

    def stored(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        s = store_pair(A, B, precision, quant, G)
        return s.A.double().to(Wd.device) @ s.B.double().to(Wd.device)

    def err(AB: torch.Tensor, Q) -> float:
        E = Wd - AB - Q.dequantize().double().to(Wd.device)
        return float(torch.einsum("ij,jk,ik->", E, Gd, E)) / max(spec.ref, 1e-300)

    tries = []
    A, B = spec.factors(rank)
    AB = stored(A, B)
    Q = q_of(Wd - AB)
    tries.append((err(AB, Q), "lowrank", A, B, Q))
    Q0 = q_of(Wd)
    A0, B0 = whitened_spectrum(Wd - Q0.dequantize().double().to(Wd.device), G, damping).factors(rank)
    tries.append((err(stored(A0, B0), Q0), "quant", A0, B0, Q0))
    e, start, A, B, Q = min(tries, key=lambda t: t[0])
    history = [e]
    for _ in range(rounds):
        A2, B2 = whitened_spectrum(Wd - Q.dequantize().double().to(Wd.device), G, damping).factors(rank)
        AB2 = stored(A2, B2)
        Q2 = q_of(Wd - AB2)
        e2 = err(AB2, Q2)
        if e2 >= e:
            break
        e, A, B, Q = e2, A2, B2, Q2
        history.append(e)
    return LayerFit(A.float().cpu(), B.float().cpu(), None, e, history, "residual", residual=_cpu(Q), start=start)


def _cpu(q):
    return type(q)(q.codes.cpu(), q.scale.cpu(), q.zero_point.cpu(), q.k, q.bits)


class ResidualSpectrum:
    """A layer's residual fits at every rank, for one low-rank precision and one residual
    storage (``bits``, ``block``): what the allocation and the evaluator ask of a form's
    spectrum (`fit_at`, `nmse`), each rank fitted once (`fit_residual`)."""

    form = "residual"

    def __init__(self, W: torch.Tensor, G: torch.Tensor, spec: Spectrum, precision: str, bits: int, block: int,
                 quant, damping: float):
        self.W, self.G, self.spec = W, G, spec
        self.precision, self.bits, self.block, self.quant, self.damping = precision, bits, block, quant, damping
        self.ref = spec.ref
        self.fits: dict[int, LayerFit] = {}

    def fit_at(self, rank: int) -> LayerFit:
        if rank not in self.fits:
            self.fits[rank] = fit_residual(self.W, self.G, self.spec, rank, self.precision, self.bits, self.block,
                                           self.quant, self.damping)
        return self.fits[rank]

    def nmse(self, rank: int) -> float:
        return self.fit_at(rank).nmse


class ResidualBank:
    """Every layer's `ResidualSpectrum` for each storage asked for, made on first use: what
    the allocation and the evaluator share, so that a residual fit is computed once.

    Args:
        weights, grams, spectra: each layer's weight, input Gram matrix (a mapping that may
            read it on demand) and whitened `Spectrum`.
        quant: the `Quantize` settings; damping: of the closed forms.
    """

    def __init__(self, weights: dict, grams, spectra: dict, quant, damping: float):
        self.weights, self.grams, self.spectra, self.quant, self.damping = weights, grams, spectra, quant, damping
        self.bank: dict[tuple, ResidualSpectrum] = {}

    def get(self, name: str, precision: str, residual_precision: str, residual_block: int) -> ResidualSpectrum:
        key = (name, precision, residual_precision, residual_block)
        if key not in self.bank:
            bits = int(residual_precision[3:])
            self.bank[key] = ResidualSpectrum(self.weights[name], self.grams[name], self.spectra[name], precision,
                                              bits, residual_block, self.quant, self.damping)
        return self.bank[key]
