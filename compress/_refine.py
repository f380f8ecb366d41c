"""Refinements after the closed form, each run through one guarded step.

A `Refinement` proposes new fits for the layers (a sparse split, compensation, a
sequential refit, distillation). `run_refinements` scores every proposal end to end on
the held-out calibration batches, keeps it only when it beats every variant before it,
and records each outcome in the plan (docs/design.md, "Refinements"; adding one:
"Adding a refinement").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._calibrate import Calibration
from ._errors import MixrankError
from ._factor import Spectrum
from ._fit import LayerFit, compensate, fit_layer
from ._registry import Registry
from ._sparse import largest_k, sparse_cost


@dataclass
class RefineContext:
    """What a refinement may use: the original model (never modified), the
    configuration, statistics, spectra, per-layer choices and allocation, the layers'
    weights, the statistics batches, and the scorer."""

    model: nn.Module
    config: object  # CompressConfig
    calib: Calibration
    spectra: dict[str, Spectrum]
    spaces: dict
    alloc: dict[str, int | None]
    weights: dict[str, torch.Tensor]
    train: list
    score_fits: Callable[[dict], float]
    held: list
    value_bytes: int = 4
    progress: bool = True
    deadline: object = None  # the `Deadline`: a stage's time bound comes from `deadline.cap`

    @property
    def tokens_per_sample(self) -> float:
        return self.calib.tokens_per_sample


@dataclass
class Outcome:
    """A refinement's proposal: the variant's name and its fits (``None`` with a
    ``note`` when it does not apply to this model), plus anything to record."""

    name: str
    fits: dict[str, LayerFit] | None
    record: dict = field(default_factory=dict)
    note: str = ""


class Refinement:
    """Interface.

    Attributes:
        settings: the `CompressConfig` settings it reads (``"refine.distill_steps"``, ...).
        switch: the `Refine` setting that turns it on (a step count or a flag).
    """

    name: str = ""
    settings: tuple[str, ...] = ()
    switch: str = ""

    def enabled(self, config) -> bool:
        return bool(getattr(config.refine, self.switch)) if self.switch else True

    def run(self, ctx: RefineContext, fits: dict[str, LayerFit], chosen: str) -> Outcome:
        """Propose fits, starting from the currently chosen ``fits`` (named ``chosen``)."""
        raise NotImplementedError


REFINEMENTS: Registry[Refinement] = Registry("refinement")


def run_refinements(ctx: RefineContext, fits: dict[str, LayerFit], start: str, start_score: float,
                    names: tuple[str, ...]) -> tuple[dict[str, LayerFit], str, float, list[dict]]:
    """The guarded step: run each enabled refinement in ``names`` in order; a proposal
    replaces the chosen fits only if its held-out score is lower than every variant
    scored before it.

    Returns:
        (chosen fits, chosen variant name, its score, every variant as recorded).
    """
    variants = [{"name": start, "score": start_score}]
    chosen, chosen_name, chosen_score = fits, start, start_score
    for name in names:
        ref = REFINEMENTS[name]
        if not ref.enabled(ctx.config) or not chosen:
            continue
        out = ref.run(ctx, chosen, chosen_name)
        if out.fits is None:
            variants.append({"name": out.name, "score": None, "note": out.note})
            continue
        score = ctx.score_fits(out.fits)
        variants.append({"name": out.name, "score": score, **out.record})
        if score < min(v["score"] for v in variants[:-1] if v["score"] is not None):
            chosen, chosen_name, chosen_score = out.fits, out.name, score
    return chosen, chosen_name, chosen_score, variants


# ------------------------------------------------------------------ sparse split


def has_sparse_k(config) -> bool:
    return any("sparse_k" in ov for ov in config.selection.overrides.values())


def split_layer(ctx: RefineContext, name: str) -> LayerFit:
    """Split a layer's allocated cost between rank and the sparse term: try giving
    0..sparse_splits rank steps to the sparse term (or the override's sparse_k), keep
    the split with the lowest layer error, then alternate on it."""
    cfg = ctx.config
    structure, step = cfg.refine.sparse, cfg.selection.rank_step
    space, rank, spec = ctx.spaces[name], ctx.alloc[name], ctx.spectra[name]
    W, G = ctx.weights[name], ctx.calib.layers[name].gram
    m, n = space.m, space.n
    cost = space.value_cost(rank, ctx.value_bytes)  # sparse sizes are counted in values
    forced = cfg.selection.overrides.get(name, {}).get("sparse_k")
    options = []
    if forced is not None:
        left = cost - sparse_cost(structure, forced, m, n, ctx.value_bytes)
        r = min(rank, left // (m + n)) if left > 0 else 0
        if r < 1:
            raise MixrankError(
                f"override {name!r}: sparse_k={forced} leaves no room for a rank >= 1 within "
                f"the layer's budget of {cost:,} parameters")
        options.append((r, forced))
    else:
        for j in range(cfg.refine.sparse_splits + 1):
            r = rank - j * step
            if r < max(1, space.floor if space.free else 1):
                break
            k = largest_k(structure, cost - r * (m + n), m, n, ctx.value_bytes)
            if j == 0 or k > 0:
                options.append((r, k))
    best = None
    for r, k in options:
        f = fit_layer(W, G, r, structure, k, cfg.damping, 0, spec)
        if best is None or f.nmse < best[0].nmse:
            best = (f, r, k)
    f, r, k = best
    if k > 0 and cfg.refine.alternate > 0:
        f = fit_layer(W, G, r, structure, k, cfg.damping, cfg.refine.alternate, spec)
    return f


@REFINEMENTS.register("sparse")
class SparseSplit(Refinement):
    """Give part of each layer's cost to a sparse term (`split_layer`)."""

    settings = ("refine.sparse", "refine.sparse_splits", "refine.alternate", "damping")

    def enabled(self, config) -> bool:
        return config.refine.sparse != "none" and (config.refine.sparse_splits > 0 or has_sparse_k(config))

    def run(self, ctx, fits, chosen):
        out = {n: split_layer(ctx, n) if fits[n].form == "lowrank" else fits[n]
               for n in tqdm(list(fits), desc=f"sparse ({ctx.config.refine.sparse})", unit="layer",
                             disable=not ctx.progress)}
        return Outcome(f"sparse_{ctx.config.refine.sparse}", out)


@REFINEMENTS.register("compensate")
class Compensate(Refinement):
    """Each layer's factors refined by Adam on its own output loss (`compensate`)."""

    settings = ("refine.compensate_steps", "refine.compensate_lr", "damping")
    switch = "compensate_steps"

    def run(self, ctx, fits, chosen):
        r = ctx.config.refine
        out = {}
        for n in tqdm(list(fits), desc="compensate", unit="layer", disable=not ctx.progress):
            if fits[n].form != "lowrank":  # a pair's layers: its error is not the layer's own
                out[n] = fits[n]
                continue
            out[n] = compensate(fits[n], ctx.weights[n], ctx.calib.layers[n].gram, ctx.spectra[n].ref,
                                r.compensate_steps, r.compensate_lr, ctx.config.damping)
        return Outcome(chosen + "+compensate", out)


# registration: the refinements that live in their own modules
from . import _distill, _sequential  # noqa: E402, F401
