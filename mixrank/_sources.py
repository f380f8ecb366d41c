"""The model a command names and the data that goes with it: the built-in digits ViT
with its own calibration and test split, or a timm model with the user's images.

Every command that needs a model, calibration data, an example input or evaluation
data gets it here, so the choice between the two kinds of source is made once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mixrank.compress import MAX_IMAGE_PIXELS, image_csv, image_folder
from mixrank.core import MixrankError

from ._demo import digits_calibration, digits_data
from ._models import DIGITS, load_model


@dataclass
class Data:
    """Batches of inputs with what to record about them.

    Attributes:
        batches: (B, C, H, W) tensors.
        labels: one integer per sample, or ``None``.
        source: where the data came from, for the plan and the report.
        key: what identifies the data for stage reuse (file list, seed).
        held_out: the data was not used to calibrate.
        record: what was used, requested, found and skipped (for the plan and report).
        note: a line stating a shortfall (files skipped, fewer than requested), or ``None``.
    """

    batches: list[torch.Tensor]
    labels: torch.Tensor | None = None
    source: str = ""
    key: list = field(default_factory=list)
    held_out: bool = True
    record: dict = field(default_factory=dict)
    note: str | None = None

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.batches)


class ModelSource:
    """A loaded model plus its data, from ``--model``/``--pretrained``/``--checkpoint``."""

    def __init__(self, name: str | None, pretrained: bool = False, checkpoint: str | None = None,
                 progress: bool = True, max_pixels: int | None = None, warn=None):
        self.max_pixels = max_pixels or MAX_IMAGE_PIXELS
        self.warn = warn or (lambda msg: None)
        self.name = name
        self.builtin = name in (None, DIGITS)
        self.model: nn.Module = load_model(name, pretrained, checkpoint, progress)

    @property
    def label(self) -> str:
        """The model's name in plans and reports."""
        return "digits_vit (built-in)" if self.builtin else str(self.name)

    def calibration(self, images: str | None, count: int, seed: int) -> Data:
        """The calibration images: the first ``count`` training digits for the built-in
        model, else up to ``count`` images of the folder ``images``."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MixrankError(f"--calib-images must be a positive number of images, got {count}")
        if self.builtin:
            if images:
                raise MixrankError("the built-in digits model calibrates on its own digits; --images "
                                   "is for a timm model (--model NAME)")
            calib = digits_calibration(count)
            used = sum(len(b) for b in calib)
            note = None if used == count else f"calibration: {used} digits used of {count} requested (the train split)"
            if note:
                self.warn(note)
            return Data(calib, source="sklearn digits, train split", key=["digits", used], held_out=False,
                        record={"used": used, "requested": count}, note=note)
        if not images:
            raise MixrankError("a timm model needs calibration images: pass --images DIR "
                               "(a flat folder or one sub-folder per class)")
        data = image_folder(images, self.model, count=count, seed=seed, max_pixels=self.max_pixels)
        return self._data(data, str(images), [sorted(data.files), seed], "calibration", held_out=False)

    def _data(self, data, source: str, key: list, what: str, held_out: bool = True) -> Data:
        note = data.shortfall()
        if note:
            note = f"{what} images ({source}): {note}"
            self.warn(note)
        labels = torch.tensor(data.labels) if data.labels else None
        return Data(data.batches, labels, source, key, held_out, data.record(), note)

    def evaluation(self, images: str | None = None, csv: str | None = None,
                   fallback: Data | None = None) -> Data:
        """Labelled evaluation data: ``csv`` (file,label rows) or the class folder
        ``images``; for the built-in model without either, its held-out test split;
        otherwise ``fallback`` (marked as not held out when it is calibration data).

        Raises:
            MixrankError: nothing to evaluate on.
        """
        if (csv or images) and self.builtin:
            raise MixrankError("the built-in digits model evaluates on its own held-out test split; "
                               "--images/--csv are for a timm model (--model NAME)")
        if csv or images:
            data = image_csv(csv, self.model, max_pixels=self.max_pixels) if csv else \
                image_folder(images, self.model, max_pixels=self.max_pixels)
            return self._data(data, str(csv or images), [sorted(data.files)], "evaluation")
        if self.builtin:
            _, _, xte, yte = digits_data()
            return Data([xte], yte, "sklearn digits, test split", ["digits-test"], record={"used": len(xte)})
        if fallback is not None:
            return fallback
        raise MixrankError("give a labelled image folder (--images DIR, one sub-folder per class) or "
                           "--csv FILE of file,label rows")

    def example(self) -> torch.Tensor:
        """A few inputs of the right shape for export (real digits for the built-in model)."""
        if self.builtin:
            return digits_data()[2][:4]
        from timm.data import resolve_data_config

        return torch.randn(2, *resolve_data_config({}, model=self.model)["input_size"])
