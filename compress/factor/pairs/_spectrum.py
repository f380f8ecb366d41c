"""A pair's closed form as a spectrum of each of its layers (`PairedSpectrum`), and the
closed forms of the pair kinds (`SPECTRA`: ``qk``, ``vo``, ``mlp``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mixrank.core import Registry

from ... import _linalg as linalg
from .._spectrum import Spectrum
from ..forms import FORMS
from ._base import Pair


@dataclass
class PairedSpectrum(Spectrum):
    """One layer of a pair, at every size r of the shared dimension.

    ``index[:r]`` are the kept output rows (form ``rows``) or input columns (``cols``);
    ``dense`` holds the kept factor's rows (``rows``: (cap, n), the B of rank r is
    ``dense[:r]``) or columns (``cols``: (m, cap)), unless ``solve`` computes it per r
    (fc2's refit depends on the whole kept set). ``bias_new[:r]`` are the kept outputs'
    new biases (``rows``; ``None``: unchanged). ``err`` is the pair's own error (the
    logits' bilinear form, the head outputs, fc2's output), in the same units for both
    layers; ``ref`` its total, so ``nmse(r)`` is the pair's relative error.
    """

    form: str = "rows"
    index: torch.Tensor = None  # (cap,) int64
    dense: torch.Tensor | None = None
    bias_new: torch.Tensor | None = None
    bias_orig: torch.Tensor | None = None
    solve: object = None  # r -> (A (m, r), bias delta (m,) or None), for a cols form that is not nested
    shape: tuple = ()
    pair: str = ""  # "qk:<first>+<second>"
    cache: dict = field(default_factory=dict)

    @property
    def nested(self) -> bool:
        return self.solve is None

    def selection(self, r: int) -> torch.Tensor:
        """The 0/1 selection factor of size r: (m, r) for ``rows``, (r, n) for ``cols``."""
        m, n = self.shape
        return FORMS[self.form].selection(self.index[:r], m if self.form == "rows" else n)

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.form == "rows":
            return self.selection(r), self.dense[:r].contiguous()
        A = self.dense[:, :r].contiguous() if self.solve is None else self._solved(r)[0]
        return A, self.selection(r)

    def bias(self, r: int) -> torch.Tensor | None:
        """The bias delta (m,) at size r (new bias minus the original), or ``None``."""
        if self.form == "cols":
            return None if self.solve is None else self._solved(r)[1]
        if self.bias_new is None:
            return None
        idx = self.index[:r]
        d = torch.zeros(self.shape[0], dtype=torch.float64)
        d[idx] = self.bias_new[:r].double() - (0.0 if self.bias_orig is None else self.bias_orig[idx].double())
        return d.float()

    def _solved(self, r: int):
        if r not in self.cache:
            if len(self.cache) >= 8:
                self.cache.pop(next(iter(self.cache)))
            self.cache[r] = self.solve(r)
        return self.cache[r]

    @property
    def has_bias_delta(self) -> bool:
        return self.bias_new is not None or self.solve is not None


@dataclass(frozen=True)
class PairForm:
    """What the allocation needs to know of a pair's layer: its ``form`` (``rows`` or
    ``cols``), whether it stores a bias delta, the ``partner`` layer it is tied to (both
    always have the same size) and the largest ``size`` the pair's spectrum has."""

    form: str
    bias_delta: bool
    partner: str
    size: int


def root(C: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + λI)^½ and its inverse, symmetric, float64 (λ = damping · mean diag C)."""
    C = C.double()
    lam = damping * float(torch.diagonal(C).mean())
    lam = lam if lam > 0 else 1e-12
    e, Q = linalg.eigh(C + lam * torch.eye(len(C), dtype=C.dtype, device=C.device))
    e = e.clamp_min(lam)
    return (Q * e.sqrt()) @ Q.T, (Q / e.sqrt()) @ Q.T


def augmented(st) -> torch.Tensor:
    """``[[G, s], [sᵀ, N]]``: the Gram matrix of the inputs with a constant 1 appended."""
    G = st.gram.double()
    s = st.sum.double().to(G.device)
    top = torch.cat([G, s[:, None]], 1)
    bottom = torch.cat([s, torch.tensor([float(st.tokens)], dtype=G.dtype, device=G.device)])[None]
    return torch.cat([top, bottom], 0)


def with_bias(lin: nn.Linear) -> torch.Tensor:
    W = lin.weight.detach().double()
    b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
    return torch.cat([W, b.to(W.device)[:, None]], 1)  # (m, n + 1)


def global_order(sigma2: torch.Tensor) -> torch.Tensor:
    """Components (heads, d) ordered by their squared singular value, largest first, as
    slot indices ``h·d + i``; a head's values are sorted, so every prefix keeps a prefix
    of each head."""
    return torch.argsort(-sigma2.reshape(-1), stable=True)


def tails(s2: torch.Tensor) -> torch.Tensor:
    """``out[r] = Σ_{i>=r} s2_i``: the error of keeping the first r components."""
    rev = torch.flip(torch.cumsum(torch.flip(s2.double(), [0]), 0), [0])
    return torch.cat([rev, rev.new_zeros(1)]).cpu()


SPECTRA: Registry[Callable] = Registry("pair kind")
"""kind → ``closed_form(pair, linears, stats, damping) -> {layer: PairedSpectrum}``."""


def pair_spectra(pairs: list[Pair], model: nn.Module, stats: dict, damping: float) -> dict[str, PairedSpectrum]:
    """Every paired layer's `PairedSpectrum` (``stats``: layer → `LayerStats`)."""
    lins = {n: model.get_submodule(n) for p in pairs for n in p.layers}
    out: dict[str, PairedSpectrum] = {}
    with torch.no_grad():
        for p in pairs:
            out.update(SPECTRA[p.kind](p, lins, stats, damping))
    return out


def pair_forms(paired: dict[str, PairedSpectrum]) -> dict[str, PairForm]:
    """The `PairForm` of every paired layer (its partner: the other layer of its pair)."""
    out = {}
    for name, spec in paired.items():
        partner = next(p for p in paired if p != name and paired[p].pair == spec.pair)
        out[name] = PairForm(spec.form, spec.has_bias_delta, partner, spec.max_rank)
    return out
