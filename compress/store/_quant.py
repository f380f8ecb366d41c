"""Storage precision of weights: fp32, fp16, and block-wise int8/int4/int2.

Integer precisions quantize a weight ``W`` (N, K) — N output rows, K the reduction axis —
in blocks of ``block`` consecutive K entries per row (K zero-padded to a whole number of
blocks). Asymmetric (the default): per block ``scale = (hi − lo) / (2^bits − 1)`` with
``lo = min(block, 0)``, ``hi = max(block, 0)``, ``zero_point = round(−lo / scale)``.
Symmetric (what TensorRT's dequantize takes): ``scale = max|w| / (2^(bits−1) − 1)`` and
``zero_point = 2^(bits−1)``, the signed code plus that offset. Then
``code = clip(round(w / scale) + zero_point, 0, 2^bits − 1)`` and
``ŵ = (code − zero_point) · scale`` in float32. That is exactly how onnxruntime's
``MatMulNBits`` and ``DequantizeLinear`` dequantize (tested bit for bit in
``tests/test_quant.py``), so the simulation in PyTorch is the engine's dequantization,
not an approximation of it.

Storage counts what the file holds: codes (padded), one float32 scale and one zero point
(packed to ``bits``) per block. docs/design.md, "Precision".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixrank.core import MixrankError

from .. import _linalg as linalg

PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
FLOAT_BYTES = {"fp32": 4, "fp16": 2}
BLOCKS = (16, 32, 64, 128)
SCALE_BYTES = 4  # scales are float32 (the graph's activation type)


def check_precision(p: str) -> str:
    if p not in PRECISIONS:
        raise MixrankError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
    return p


@dataclass
class QTensor:
    """A block-quantized (N, K) weight: ``codes`` uint8 (N, blocks, block) one code per
    byte (packed only on export), ``scale`` float32 (N, blocks), ``zero_point`` uint8
    (N, blocks), and the true K (the padding is zero: its codes are the zero point)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    k: int
    bits: int

    @property
    def block(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def symmetric(self) -> bool:
        return bool((self.zero_point == 2 ** (self.bits - 1)).all())

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32: ``(code − zero_point) · scale``."""
        w = (self.codes.float() - self.zero_point.float().unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return w.reshape(w.shape[0], -1)[:, : self.k]


GRIDS = ("mse", "minmax")
GRID_STEPS = 20  # shrink factors tried by the "mse" grid, from 1 down to GRID_SHRINK
GRID_SHRINK = 0.5


def _grid(Wb: torch.Tensor, qmax: int, symmetric: bool = False, grid: str = "minmax"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of blocks ``Wb`` (..., block): the min/max grid (``"minmax"``),
    or the grid whose range, shrunk by one of `GRID_STEPS` factors down to `GRID_SHRINK`,
    rounds the block with the least squared error (``"mse"``: clipping a few outliers
    buys every other weight a finer step; decisive at 2 bits)."""
    scale, zp = _minmax_grid(Wb, qmax, symmetric)
    if grid == "minmax":
        return scale, zp
    w = Wb.float()

    def sq_error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(torch.round(w / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, qmax)
        return ((w - (c - z.unsqueeze(-1)) * s.unsqueeze(-1)) ** 2).sum(-1)

    best = sq_error(scale, zp)
    for i in range(1, GRID_STEPS + 1):
        f = 1.0 - (1.0 - GRID_SHRINK) * i / GRID_STEPS
        s, z = _minmax_grid(Wb * f, qmax, symmetric)
        e = sq_error(s, z)
        better = e < best
        scale, zp, best = torch.where(better, s, scale), torch.where(better, z, zp), torch.where(better, e, best)
    return scale, zp


def _minmax_grid(Wb: torch.Tensor, qmax: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero point) of blocks ``Wb`` (..., block): the min/max grid with
    zero inside it, or the symmetric grid around zero."""
    if symmetric:
        half = (qmax + 1) // 2
        scale = Wb.abs().amax(-1).float() / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, float(half))
    lo = Wb.amin(-1).clamp_max(0.0).float()
    hi = Wb.amax(-1).clamp_min(0.0).float()
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zp


def quantize(W: torch.Tensor, bits: int, block: int, H: torch.Tensor | None = None,
             damping: float = 0.01, symmetric: bool = False, grid: str = "minmax") -> QTensor:
    """Block-wise asymmetric quantization of ``W`` (N, K) along K (see the module docs).

    Without ``H`` every weight rounds to its nearest code (RTN). With ``H`` (K, K), the
    Gram matrix of the layer's inputs, the rounding errors are fed forward (GPTQ: Frantar
    et al., 2022): column by column, the error of a rounded column is compensated on the
    columns not yet rounded through ``H⁻¹``, minimising ``tr(E H Eᵀ)`` — the layer's
    output error — instead of the weight error; each block's grid is set from its weights
    as they stand when the block is reached (``grid``: `_grid`'s min/max or least-squares
    range). Either way the result is codes, scales and zero points, read back exactly as
    the engine does.
    """
    if block not in BLOCKS:
        raise MixrankError(f"block size must be one of {BLOCKS} (onnxruntime's MatMulNBits), got {block}")
    N, K = W.shape
    nb = -(-K // block)
    qmax = 2**bits - 1
    Wp = torch.zeros(N, nb * block, dtype=torch.float64 if H is not None else torch.float32, device=W.device)
    Wp[:, :K] = W.detach()
    if H is None:
        Wb = Wp.reshape(N, nb, block)
        scale, zp = _grid(Wb, qmax, symmetric, grid)
        codes = torch.clamp(torch.round(Wb / scale.unsqueeze(-1)) + zp.unsqueeze(-1), 0, qmax)
        return QTensor(codes.to(torch.uint8), scale.contiguous(), zp.to(torch.uint8), K, bits)
    Hinv = _inverse_factor(H.to(Wp.device), K, nb * block, damping)
    codes = torch.empty(N, nb * block, dtype=torch.float64, device=W.device)
    scale = torch.empty(N, nb, dtype=torch.float32, device=W.device)
    zp = torch.empty(N, nb, dtype=torch.float64, device=W.device)
    for b in range(nb):  # one block of columns at a time; the update of the rest is one matmul
        lo, hi = b * block, (b + 1) * block
        Wk = Wp[:, lo:hi].clone()
        s, z = _grid(Wk, qmax, symmetric, grid)
        scale[:, b], zp[:, b] = s, z
        s64 = s.double()
        Err = torch.empty_like(Wk)
        for j in range(block):
            w = Wk[:, j]
            c = torch.clamp(torch.round(w / s64) + z, 0, qmax)
            codes[:, lo + j] = c
            err = (w - (c - z) * s64) / Hinv[lo + j, lo + j]
            Wk[:, j + 1:] -= err.unsqueeze(1) * Hinv[lo + j, lo + j + 1:hi].unsqueeze(0)
            Err[:, j] = err
        Wp[:, hi:] -= Err @ Hinv[lo:hi, hi:]
    return QTensor(codes.reshape(N, nb, block).to(torch.uint8), scale, zp.to(torch.uint8), K, bits)


def _inverse_factor(H: torch.Tensor, K: int, Kp: int, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + λI)⁻¹`` (Kp, Kp) with the K padding columns set
    to identity (they are zero and stay zero)."""
    H = H.double()
    lam = damping * float(torch.diagonal(H).mean()) if float(torch.diagonal(H).mean()) > 0 else 1.0
    Hp = torch.eye(Kp, dtype=torch.float64, device=H.device)
    Hp[:K, :K] = H + lam * torch.eye(K, dtype=torch.float64, device=H.device)
    dead = torch.diagonal(Hp) <= 0
    Hp[dead, dead] = 1.0
    L = linalg.cholesky(Hp)
    return linalg.cholesky(linalg.cholesky_inverse(L), upper=True)


def fake_quant(W: torch.Tensor, precision: str, block: int = 32, H: torch.Tensor | None = None,
               symmetric: bool = False) -> torch.Tensor:
    """``W`` (N, K) as stored at ``precision`` and read back, in float32 (integers: GPTQ
    when the input Gram ``H`` is given, else RTN)."""
    if precision == "fp32":
        return W.float()
    if precision == "fp16":
        return W.half().float()
    return quantize(W, INT_BITS[precision], block, H, symmetric=symmetric).dequantize().to(W.device)


def ste(W: torch.Tensor, precision: str, block: int = 32, symmetric: bool = False) -> torch.Tensor:
    """`fake_quant` (round to nearest) with a straight-through gradient, so that a
    refinement can train through the rounding."""
    if precision == "fp32":
        return W
    return W + (fake_quant(W.detach(), precision, block, symmetric=symmetric).to(W.dtype) - W).detach()


def rebalanced_ste(A: torch.Tensor, B: torch.Tensor, precision: str, quant) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor pair as stored (rescaled by ``quant.split``, rounded), differentiable in
    ``A`` and ``B`` through a straight-through rounding."""
    with torch.no_grad():
        a = A.double().norm(dim=0).clamp_min(1e-30)
        b = B.double().norm(dim=1).clamp_min(1e-30)
        d = {"us": torch.ones_like(a), "balanced": (a / b).sqrt(), "u": a}[quant.split].to(A.dtype)
    sym = quant.scheme == "symmetric"
    return (ste(A / d, precision, quant.block, sym), ste(B * d.unsqueeze(1), precision, quant.block, sym))


def storage_bytes(N: int, K: int, precision: str, block: int = 32, symmetric: bool = False) -> int:
    """Bytes an (N, K) weight takes at ``precision`` (integers: codes with K padded, one
    scale per block, and packed zero points unless symmetric)."""
    if precision in FLOAT_BYTES:
        return N * K * FLOAT_BYTES[precision]
    bits = INT_BITS[precision]
    nb = -(-K // block)
    return N * (nb * block * bits // 8 + nb * SCALE_BYTES + (0 if symmetric else math.ceil(nb * bits / 8)))


def rebalance(A: torch.Tensor, B: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``A B`` with the rank components rescaled for storage:
    ``"us"`` leaves them, ``"balanced"`` gives column i of A and row i of B equal norms
    (``A = U Σ^½``, ``B = Σ^½ Vᵀ L⁻¹`` for the closed form), ``"u"`` gives A unit columns
    (``A = U``, ``B = Σ Vᵀ L⁻¹``). Exact in exact arithmetic."""
    if split == "us":
        return A, B
    a = A.double().norm(dim=0).clamp_min(1e-30)  # (r,)
    b = B.double().norm(dim=1).clamp_min(1e-30)
    d = (a / b).sqrt() if split == "balanced" else a
    return (A.double() / d).to(A.dtype), (B.double() * d.unsqueeze(1)).to(B.dtype)


SPLITS = ("us", "balanced", "u")


def per_channel_int8(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored weight ``q`` requantized symmetric int8 per output channel, the weights
    of onnxruntime's dynamic int8 (``MatMulInteger``): (codes int8 (N, K), scales float32
    (N,)) with ``codes · scale`` within half a step of ``q.dequantize()`` (round half to
    even; an all-zero row gets scale 1). The exporter writes exactly these codes."""
    return per_channel_int8_of(q.dequantize())


def per_channel_int8_of(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_channel_int8` of a weight given as its read-back float values (N, K)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dynamic_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` as onnxruntime's dynamic int8 computes it: ``x`` quantized to uint8 per
    tensor (``DynamicQuantizeLinear``: the range widened to hold 0, the zero point and the
    codes rounded half to even and saturated), times the int8 ``codes`` (N, K), scaled by the
    activation's scale times ``scale`` (N,). The integer sums are taken in ``x``'s float
    type (exact below 2^24 in float32), so the engine agrees to float rounding; the
    rounding of an activation that falls within an ulp of a half step may differ."""
    lo = torch.clamp(x.detach().amin(), max=0)
    hi = torch.clamp(x.detach().amax(), min=0)
    xs = (hi - lo) / 255
    if float(xs) == 0:
        return x.new_zeros(*x.shape[:-1], codes.shape[0])
    zp = torch.round(torch.clamp(-lo / xs, 0, 255))
    xq = torch.clamp(torch.round(x / xs) + zp, 0, 255) - zp
    return torch.nn.functional.linear(xq, codes.to(x.dtype)) * (xs * scale.to(x.dtype))
