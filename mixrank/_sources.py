"""The model a command names and the data that goes with it: the built-in digits ViT
with its own calibration and test split, a timm model with the user's images, or a
Hugging Face folder (an image classifier with images, a text encoder with texts).

Every command that needs a model, calibration data, an example input or evaluation
data gets it here, so the choice between the two kinds of source is made once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from mixrank.compress import MAX_IMAGE_PIXELS, image_csv, image_folder
from mixrank.compress.calibrate import batch_size
from mixrank.core import MixrankError

from ._demo import digits_calibration, digits_data
from ._hf import hf_folder, image_transform, load_hf
from ._models import DIGITS, load_model
from ._texts import MAX_LENGTH, read_texts, text_batches


@dataclass
class Data:
    """Batches of inputs with what to record about them.

    Attributes:
        batches: (B, C, H, W) tensors, or dicts of (B, T) tensors for a text model.
        labels: one integer per sample, or ``None``.
        source: where the data came from, for the plan and the report.
        key: what identifies the data for stage reuse (file list, seed).
        held_out: the data was not used to calibrate.
        record: what was used, requested, found and skipped (for the plan and report).
        note: a line stating a shortfall (files skipped, fewer than requested), or ``None``.
    """

    batches: list
    labels: torch.Tensor | None = None
    source: str = ""
    key: list = field(default_factory=list)
    held_out: bool = True
    record: dict = field(default_factory=dict)
    note: str | None = None

    @property
    def x(self) -> torch.Tensor:
        """Every sample as one tensor (image batches only)."""
        return torch.cat(self.batches)

    @property
    def count(self) -> int:
        return sum(batch_size(b) for b in self.batches)

    def head(self, n: int):
        """The first ``n`` samples as one model input (for a text model: of the first batch,
        at its padding)."""
        if isinstance(self.batches[0], dict):
            b = self.batches[0]
            k = min(n, batch_size(b))
            return {name: t[:k] for name, t in b.items()}
        return self.x[:n]

    def feeds(self, names: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
        """The batches as engine feeds, input name → array."""
        if isinstance(self.batches[0], dict):
            return [{k: b[k].numpy() for k in names if k in b} for b in self.batches]
        return [{names[0]: b.numpy()} for b in self.batches]


def check_texts(*paths: str | None) -> None:
    """Read every text file given (``None``: none), so that a bad one fails before any
    model is loaded.

    Raises:
        MixrankError: the first file that is missing, not text, or holds no usable text.
    """
    for path in paths:
        if path is not None:
            read_texts(path)


def held_out_texts(ev: Data, calib: Data, warn=None) -> Data:
    """``ev`` marked as not held out when its texts are all calibration texts, with a
    note when some are (a text model's evaluation file may repeat its calibration file)."""
    if len(ev.key) < 2 or len(calib.key) < 2 or not isinstance(ev.key[1], list):
        return ev
    seen = set(calib.key[1])
    shared = sum(t in seen for t in ev.key[1])
    if not shared:
        return ev
    note = f"{shared} of the {len(ev.key[1])} evaluation texts are calibration texts"
    if warn:
        warn(note)
    return Data(ev.batches, ev.labels, ev.source, ev.key, shared < len(ev.key[1]) and ev.held_out,
                {**ev.record, "shared_with_calibration": shared}, "; ".join(n for n in (ev.note, note) if n))


def text_feeds(model: str, texts: str | None, names: tuple[str, ...], max_length: int = MAX_LENGTH,
               warn=None) -> Data:
    """The texts of the file ``texts`` (``None``: the shipped evaluation texts) tokenised by
    the tokenizer of the Hugging Face folder ``model`` (its weights are not loaded), as
    batches of the graph inputs ``names``: what ``mixrank bench`` measures fidelity on.

    Raises:
        MixrankError: ``model`` is not a Hugging Face folder with a tokenizer.
    """
    folder = hf_folder(model)
    if folder is None:
        raise MixrankError(f"--model {model} is not a Hugging Face folder; texts need its tokenizer")
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ImportError:
        raise MixrankError("texts need transformers: pip install 'mixrank[text]'") from None
    except Exception as e:  # transformers raises many types for a folder without a tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MixrankError(f"cannot load the tokenizer of {folder}: {first[:200]}") from None
    t = read_texts(texts, "evaluation")
    batches, truncated = text_batches(tok, t.texts, names, max_length)
    missing = [n for n in names if n not in batches[0]]
    if missing:
        raise MixrankError(f"the tokenizer of {folder} gives no {', '.join(missing)}, which the graph takes")
    data = Data(batches, None, t.source, [t.source, t.texts, max_length], True,
                t.record(len(t.texts), truncated, max_length))
    data.note = _text_note("evaluation", t, len(t.texts), None, truncated, max_length)
    if data.note and warn:
        warn(data.note)
    return data


def _text_note(which: str, t, used: int, count: int | None, truncated: int, max_length: int) -> str | None:
    """One line stating what was left out of a text set (skipped lines, fewer texts than
    requested, texts cut), or ``None``."""
    parts = []
    if t.skipped:
        parts.append(f"{len(t.skipped)} line(s) skipped (first: line {t.skipped[0][0]}: {t.skipped[0][1]})")
    if count and used < count:
        parts.append(f"{used} texts used of {count} requested")
    if truncated:
        parts.append(f"{truncated} text(s) cut to {max_length} tokens")
    return f"{which} texts ({t.source}): " + "; ".join(parts) if parts else None


class ModelSource:
    """A loaded model plus its data, from ``--model``/``--pretrained``/``--checkpoint``: the
    built-in digits ViT, a timm name, or a Hugging Face folder (``hf:PATH``, a folder path,
    or ``minilm``) of an image classifier or a text encoder."""

    def __init__(self, name: str | None, pretrained: bool = False, checkpoint: str | None = None,
                 progress: bool = True, max_pixels: int | None = None, warn=None, max_length: int = MAX_LENGTH):
        self.max_pixels = max_pixels or MAX_IMAGE_PIXELS
        self.warn = warn or (lambda msg: None)
        self.name = name
        self.builtin = name in (None, DIGITS)
        self.max_length = max_length
        folder = None if self.builtin else hf_folder(name)
        self.hf = None
        if folder is not None:
            if pretrained or checkpoint:
                raise MixrankError("a Hugging Face folder holds its own weights; give no --pretrained/--checkpoint")
            self.hf = load_hf(folder)
            self.model: nn.Module = self.hf.model
        else:
            self.model = load_model(name, pretrained, checkpoint, progress)

    @property
    def kind(self) -> str:
        """``"text"`` (dict batches of token ids) or ``"image"``."""
        return self.hf.kind if self.hf is not None else "image"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.hf.input_names if self.hf is not None else ("input",)

    @property
    def output_name(self) -> str:
        return self.hf.output if self.hf is not None else "output"

    @property
    def token_mask(self) -> str | None:
        """The key of the padding mask of its batches (what compression leaves out)."""
        return "attention_mask" if self.kind == "text" else None

    def configure(self, cfg):
        """``cfg`` (a `CompressConfig`) with what this model needs: a text model's padding
        mask (``token_mask="attention_mask"``) unless the configuration names one."""
        if self.token_mask is None or cfg.token_mask is not None:
            return cfg
        from mixrank.compress import CompressConfig

        return CompressConfig.from_dict({**cfg.to_dict(), "token_mask": self.token_mask})

    def source(self, calib: Data, like: dict | None = None) -> dict:
        """What the plan records about the model and its calibration data (and the
        ``--like`` sibling whose size is the budget)."""
        what = "calibration_texts" if self.kind == "text" else "calibration_images"
        out = {"model": self.label, "calibration": calib.source, what: calib.record}
        if like:
            out["like"] = like
        return out

    @property
    def label(self) -> str:
        """The model's name in plans and reports."""
        if self.builtin:
            return "digits_vit (built-in)"
        if self.hf is not None and str(self.hf.path) != self.name:
            return f"{self.name} ({self.hf.path})"
        return str(self.name)

    def calibration(self, images: str | None, count: int, seed: int, texts: str | None = None) -> Data:
        """The calibration data: the first ``count`` training digits for the built-in model;
        up to ``count`` texts of the file ``texts`` (or the shipped calibration texts) for a
        text model; else up to ``count`` images of the folder ``images``."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MixrankError(f"--calib-images must be a positive number of images, got {count}")
        if self.kind == "text":
            if images:
                raise MixrankError(f"{self.label} is a text model: give --texts FILE, not --images")
            return self._texts(texts, "calibration", count, held_out=False)
        if self.max_length != MAX_LENGTH:
            raise MixrankError("--max-length is for a text model; this model takes images")
        if texts:
            raise MixrankError("--texts is for a text model; this model takes images (--images)")
        if self.builtin:
            return self._digits(images, count)
        if not images:
            raise MixrankError("an image model needs calibration images: pass --images DIR "
                               "(a flat folder or one sub-folder per class)")
        data = image_folder(images, self.model, count=count, seed=seed, max_pixels=self.max_pixels,
                            transform=self._transform())
        return self._data(data, str(images), [sorted(data.files), seed], "calibration", held_out=False)

    def _digits(self, images: str | None, count: int) -> Data:
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

    def _transform(self):
        return image_transform(self.hf) if self.hf is not None else None

    def _texts(self, path: str | None, which: str, count: int | None, held_out: bool) -> Data:
        t = read_texts(path, which)
        texts = t.texts[:count] if count else t.texts
        batches, truncated = text_batches(self.hf.processor, texts, self.input_names, self.max_length)
        record = {**t.record(len(texts), truncated, self.max_length), "requested": count}
        note = _text_note(which, t, len(texts), count, truncated, self.max_length)
        if note:
            self.warn(note)
        key = [t.source, texts, self.max_length]
        return Data(batches, None, t.source, key, held_out, record, note)

    def _data(self, data, source: str, key: list, what: str, held_out: bool = True) -> Data:
        note = data.shortfall()
        if note:
            note = f"{what} images ({source}): {note}"
            self.warn(note)
        labels = torch.tensor(data.labels) if data.labels else None
        return Data(data.batches, labels, source, key, held_out, data.record(), note)

    def evaluation(self, images: str | None = None, csv: str | None = None,
                   fallback: Data | None = None, texts: str | None = None) -> Data:
        """Evaluation data: for a text model the file ``texts`` (or the shipped evaluation
        texts, disjoint from the shipped calibration texts); else labelled images, ``csv``
        (file,label rows) or the class folder ``images``; for the built-in model without
        either, its held-out test split; otherwise ``fallback`` (marked as not held out when
        it is calibration data).

        Raises:
            MixrankError: nothing to evaluate on.
        """
        if self.kind == "text":
            if csv or images:
                raise MixrankError(f"{self.label} is a text model: give --eval-texts FILE, not images")
            return self._texts(texts, "evaluation", None, held_out=True)
        if texts:
            raise MixrankError("--eval-texts is for a text model; this model takes images (--eval-images)")
        if (csv or images) and self.builtin:
            raise MixrankError("the built-in digits model evaluates on its own held-out test split; "
                               "--images/--csv are for a timm model (--model NAME)")
        if csv or images:
            tf = self._transform()
            data = image_csv(csv, self.model, max_pixels=self.max_pixels, transform=tf) if csv else \
                image_folder(images, self.model, max_pixels=self.max_pixels, transform=tf)
            return self._data(data, str(csv or images), [sorted(data.files)], "evaluation")
        if self.builtin:
            _, _, xte, yte = digits_data()
            return Data([xte], yte, "sklearn digits, test split", ["digits-test"], record={"used": len(xte)})
        if fallback is not None:
            return fallback
        raise MixrankError("give a labelled image folder (--images DIR, one sub-folder per class) or "
                           "--csv FILE of file,label rows")

    def example(self, texts: str | None = None):
        """A few inputs of the right shape for export (real digits for the built-in model, a
        few texts of the file ``texts`` or of the shipped ones for a text model)."""
        if self.builtin:
            return digits_data()[2][:4]
        if self.kind == "text":
            return self._texts(texts, "calibration", 4, held_out=False).head(4)
        if texts:
            raise MixrankError("--texts is for a text model; this model takes images")
        if self.hf is not None:
            cfg = self.model.net.config
            size = getattr(cfg, "image_size", 224)
            return torch.randn(2, getattr(cfg, "num_channels", 3), size, size)
        from timm.data import resolve_data_config

        return torch.randn(2, *resolve_data_config({}, model=self.model)["input_size"])
