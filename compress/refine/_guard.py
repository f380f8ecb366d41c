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
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn as nn

from mixrank.core import Record, Registry

from .._limits import Deadline
from ..calibrate import Calibration
from ..factor import LayerFit, Spectrum

if TYPE_CHECKING:  # annotations only: the configuration imports the refinements' registry
    from .._config import CompressConfig


@dataclass
class RefineContext:
    """What a refinement may use.

    Attributes:
        model: the original model (never modified).
        config: the `CompressConfig`.
        calib: the calibration statistics (`Calibration`).
        spectra: each layer's `Spectrum` (a pair's layer: its `PairedSpectrum`).
        spaces: each layer's `LayerSpace` (its form and storage precision).
        alloc: the allocated rank per layer (``None``: dense).
        weights: each layer's original weight.
        train: the statistics batches (the held-out ones excluded).
        score_fits: the held-out output error of fits as stored (the guard's score).
        held: the held-out batches that score.
        value_bytes: bytes of one float value of a sparse term (4, or 2 at fp16).
        progress: show progress bars.
        deadline: the wall-clock cap (`Deadline`); a stage's time bound comes from
            ``deadline.cap``.
    """

    model: nn.Module
    config: CompressConfig
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
    deadline: Deadline | None = None

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


@dataclass(eq=False)
class Variant(Record):
    """One variant the guarded step scored, as the plan records it: ``name``, its held-out
    ``score`` (``None`` with a ``note`` when the refinement did not apply) and whatever
    the refinement recorded (extra keys)."""

    _optional: ClassVar[frozenset[str]] = frozenset({"note"})

    name: str
    score: float | None
    note: str | None = None


class RefineResult(NamedTuple):
    """The guarded step's result: the chosen fits, the chosen variant's name and score,
    and every variant scored (the start first)."""

    fits: dict[str, LayerFit]
    chosen: str
    score: float
    variants: list[Variant]


class Refinement:
    """Interface.

    Attributes:
        settings: the `CompressConfig` settings it reads (``"refine.distill_steps"``, ...).
        switch: the `Refine` setting that turns it on (a step count or a flag).
    """

    name: str = ""
    settings: tuple[str, ...] = ()
    switch: str = ""

    def enabled(self, config: CompressConfig) -> bool:
        """Whether it runs under ``config`` (by default: its ``switch`` is set)."""
        return bool(getattr(config.refine, self.switch)) if self.switch else True

    def run(self, ctx: RefineContext, fits: dict[str, LayerFit], chosen: str) -> Outcome:
        """Propose fits, starting from the currently chosen ``fits`` (named ``chosen``)."""
        raise NotImplementedError


REFINEMENTS: Registry[Refinement] = Registry("refinement")


def run_refinements(ctx: RefineContext, fits: dict[str, LayerFit], start: str, start_score: float,
                    names: tuple[str, ...]) -> RefineResult:
    """The guarded step: run each enabled refinement in ``names`` in order; a proposal
    replaces the chosen fits only if its held-out score is lower than every variant
    scored before it.

    Args:
        ctx: the `RefineContext`.
        fits: the fits to start from, named ``start``, with held-out score ``start_score``.
        names: `REFINEMENTS` names, in the order they run.

    Returns:
        `RefineResult`.
    """
    variants = [Variant(start, start_score)]
    chosen, chosen_name, chosen_score = fits, start, start_score
    for name in names:
        ref = REFINEMENTS[name]
        if not ref.enabled(ctx.config) or not chosen:
            continue
        out = ref.run(ctx, chosen, chosen_name)
        if out.fits is None:
            variants.append(Variant(out.name, None, out.note))
            continue
        score = ctx.score_fits(out.fits)
        variants.append(Variant.from_dict({"name": out.name, "score": score, **out.record}))
        if score < min(v.score for v in variants[:-1] if v.score is not None):
            chosen, chosen_name, chosen_score = out.fits, out.name, score
    return RefineResult(chosen, chosen_name, chosen_score, variants)
