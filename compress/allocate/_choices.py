"""What each layer may become: its spaces of choices at a precision (`LayerChoices`), and,
for the allocation over every form, its options with their measured errors."""

from __future__ import annotations

from dataclasses import replace

import torch

from mixrank.core import MixrankError

from ..factor import ResidualBank
from ..store import storage_bytes, store_pair, store_weight
from ._allocators import auto_precisions
from ._mixed import Option
from ._spaces import LayerSpace, alloc_cost, feasible_range, layer_spaces
from ._uniform import uniform_allocation

# the options of the allocation over every form (precision "auto"), per layer
DENSE_OPTIONS = (("fp16", 0), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128), ("int2", 32), ("int2", 64),
                 ("int2", 128))
FACTOR_PRECISIONS = ("fp16", "int8", "int4")
FACTOR_FRACTIONS = (0.125, 0.25, 0.5)  # ranks offered: these fractions of the largest useful rank
RESIDUAL_OPTIONS = (("fp16", 8, "int2", 128), ("fp16", 16, "int2", 128))  # (low-rank precision, rank, Q, block)


class LayerChoices:
    """Builds the layers' spaces of choices (`LayerSpace`) at a precision, with the model's
    pairs in their forms or not (the allocator calls it as ``choices(precision, paired)``),
    and, once `attach` gave it the statistics, every layer's `Option`s (`options`)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], config):
        self.shapes, self.selection, self.quantize = shapes, config.selection, config.quantize
        self.unit = config.budget.unit
        self.damping = config.damping
        self.forms = config.search.forms
        self.pairs: dict = {}  # layer -> its PairForm, once the pairs' spectra exist
        self.weights = self.grams = self.spectra = self.residuals = None

    def __call__(self, precision: str = "fp32", paired: bool = False, unit: str | None = None
                 ) -> dict[str, LayerSpace]:
        sel, q = self.selection, self.quantize
        return layer_spaces(self.shapes, sel.rank_step, sel.min_rank, sel.overrides, unit or self.unit, precision,
                            q.block, q.scheme == "symmetric", self.pairs if paired else None)

    def attach(self, weights: dict, grams, spectra: dict) -> ResidualBank:
        """The statistics the options are measured with; returns the `ResidualBank` that the
        evaluator shares."""
        self.weights, self.grams, self.spectra = weights, grams, spectra
        self.residuals = ResidualBank(weights, grams, spectra, self.quantize, self.damping)
        return self.residuals

    def check_feasible(self, budget: int, precision: str) -> None:
        """Fail before reading data when no allocation can meet the budget.

        Raises:
            MixrankError: names the smallest storage any precision allows.
        """
        if precision != "auto":
            uniform_allocation(self(precision), budget, self.selection.rank_step)  # raises, naming the range
            return
        for p in auto_precisions(self.quantize):
            spaces = self(p)
            if feasible_range(spaces)[0] <= budget or alloc_cost(spaces, {n: None for n in spaces}) <= budget:
                return
        sym = self.quantize.scheme == "symmetric"
        low = self.quantize.widths[-1]
        lo = sum(storage_bytes(m, n, low, 128, sym) for m, n in self.shapes.values())
        if lo <= budget:
            return
        raise MixrankError(f"budget of {budget:,} bytes is below the smallest storage any precision allows for "
                           f"the selected layers ({lo:,} bytes: every layer dense at {low}, block 128); raise the "
                           "budget")

    # ------------------------------------------------------------------ options

    def options(self, forms: tuple[str, ...] | None = None) -> dict[str, list[Option]]:
        """Every selected layer's options among ``forms`` (``"dense"``: every integer width
        and block; ``"lowrank"``: factors at a few ranks and precisions; ``"residual"``: low
        rank plus a quantized residual; ``None``: ``search.forms``), each with its layer
        error as stored. A layer with an override keeps it (``dense``: dense options only;
        ``rank``: factors at that rank)."""
        if self.weights is None:
            raise RuntimeError("LayerChoices.options before attach")
        forms = self.forms if forms is None else forms
        base = self("fp32", unit="bytes")
        return {n: self._layer_options(n, base[n], forms) for n in self.shapes}

    def _error(self, name: str, What: torch.Tensor) -> float:
        W, G = self.weights[name], self.grams[name]
        E = W.double().to(G.device) - What.double().to(G.device)
        return float(torch.einsum("ij,jk,ik->", E, G.double(), E)) / max(self.spectra[name].ref, 1e-300)

    def _layer_options(self, name: str, sp: LayerSpace, forms: tuple[str, ...]) -> list[Option]:
        ov = self.selection.overrides.get(name, {})
        out = []
        if "rank" not in ov:
            out += self._dense_options(name, sp)
        if not ov.get("dense") and not sp.dense:
            if "lowrank" in forms or "rank" in ov:
                out += self._factor_options(name, sp, ov.get("rank"))
            if "residual" in forms and "rank" not in ov:
                out += self._residual_options(name, sp)
        return out

    def _dense_options(self, name: str, sp: LayerSpace) -> list[Option]:
        out, W, G = [], self.weights[name], self.grams[name]
        for p, block in DENSE_OPTIONS:
            if not self.quantize.allows(p):
                continue
            space = replace(sp, precision=p, block=block or self.quantize.block, dense=True, fixed=None)
            _, What = store_weight(W, p, self.quantize, G, block=space.block)
            label = f"dense {p}" + (f" b{block}" if block else "")
            out.append(Option(space, None, space.stored_bytes(None), self._error(name, What), label))
        return out

    def _factor_options(self, name: str, sp: LayerSpace, fixed: int | None) -> list[Option]:
        spec, G = self.spectra[name], self.grams[name]
        ranks = [fixed] if fixed else sorted({max(sp.floor, int(sp.cap * f) // sp.step * sp.step)
                                              for f in FACTOR_FRACTIONS if sp.cap >= sp.floor})
        out = []
        for p in FACTOR_PRECISIONS:
            if not self.quantize.allows(p):
                continue
            space = replace(sp, precision=p)
            for r in ranks:
                A, B = spec.factors(r)
                s = store_pair(A, B, p, self.quantize, G)
                out.append(Option(space, r, space.stored_bytes(r), self._error(name, s.A @ s.B), f"lowrank r{r} {p}"))
        return out

    def _residual_options(self, name: str, sp: LayerSpace) -> list[Option]:
        out = []
        for p, r, qp, qb in RESIDUAL_OPTIONS:
            if r > sp.cap or not self.quantize.allows(qp):
                continue
            space = replace(sp, precision=p, form="residual", residual_precision=qp, residual_block=qb, fixed=r)
            fit = self.residuals.get(name, p, qp, qb).fit_at(r)
            out.append(Option(space, r, space.stored_bytes(r), fit.nmse, f"residual r{r} {p} + {qp} b{qb}"))
        return out
