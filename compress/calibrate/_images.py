"""Calibration data: an image-folder loader that uses a timm model's preprocessing."""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from mixrank.core import MixrankError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
# Decoded size cap: a 140 KB PNG can decode to 144 Mpixel (1.7 GB). 40 Mpixel holds any
# camera photo; --max-image-pixels raises it.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass
class ImageBatches:
    """Preprocessed images in batches, with what was skipped.

    Attributes:
        batches: (B, C, H, W) float tensors.
        files: the files used, in batch order.
        labels: class index per used file, or ``None`` for a flat folder.
        classes: class names (sub-folder names) of a class-per-folder tree.
        skipped: ``(file, reason)`` for every unreadable file.
        requested: how many images were asked for (``None``: all).
        found: how many image files there were.
    """

    batches: list[torch.Tensor] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    requested: int | None = None
    found: int = 0

    def shortfall(self, what: str = "images") -> str | None:
        """One line saying what was skipped or missing, or ``None`` when nothing was."""
        parts = []
        if self.skipped:
            first, why = self.skipped[0]
            parts.append(f"{len(self.skipped)} unreadable file(s) skipped (first: {first}: {why[:120]})")
        if self.requested is not None and len(self.files) < self.requested:
            parts.append(f"{len(self.files)} {what} used of {self.requested} requested")
        return "; ".join(parts) or None

    def record(self) -> dict:
        """What the plan and the report record about the data."""
        return {"used": len(self.files), "requested": self.requested, "found": self.found,
                "skipped": len(self.skipped), "skipped_files": [f for f, _ in self.skipped[:20]]}

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def model_transform(model: nn.Module):
    """The evaluation transform of a timm model (its own resize, crop, mean, std)."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return create_transform(**cfg, is_training=False)


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files under ``root``: a flat folder, or a class-per-folder tree
    (``root/<class>/<image>``). Returns (files, labels or None, classes)."""
    root = Path(root)
    if not root.is_dir():
        raise MixrankError(f"image folder {root} does not exist or is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if subdirs and not flat:
        files, labels = [], []
        for i, d in enumerate(subdirs):
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(p)
                    labels.append(i)
        return files, labels, [d.name for d in subdirs]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return files, None, []


def image_folder(
    root: str | os.PathLike,
    model: nn.Module | None = None,
    count: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    transform=None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ImageBatches:
    """Load up to ``count`` images from ``root`` (seeded random choice), preprocessed
    with ``model``'s own timm data config (or ``transform``), in batches.

    Unreadable files are skipped and counted (`ImageBatches.shortfall` says so); zero
    usable images is an error, and so is an image whose header declares more than
    ``max_pixels`` pixels (checked before decoding: a decompression bomb).

    Args:
        root: a flat folder, or one sub-folder per class (then labelled).
        model: the timm model whose data config preprocesses (unless ``transform``).
        count: at most this many images (``None``: all); seed: the seed of the choice.
        batch_size: images per batch (32).
        transform: a PIL → tensor transform to use instead of the model's.
        max_pixels: the decoded-size cap (`MAX_IMAGE_PIXELS`, 40 million).

    Raises:
        MixrankError: no folder, no usable image, a bad count or batch size, a bomb.
    """
    from PIL import Image

    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise MixrankError(f"image count must be >= 1, got {count}")
    if batch_size < 1:
        raise MixrankError(f"batch size must be >= 1, got {batch_size}")
    if transform is None:
        if model is None:
            raise MixrankError("image_folder needs a model (for its preprocessing) or a transform")
        transform = model_transform(model)
    files, labels, classes = list_images(root)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    out = ImageBatches(classes=classes, labels=[] if labels is not None else None, requested=count,
                       found=len(files))
    current: list[torch.Tensor] = []
    for i in order:
        if count is not None and len(out.files) >= count:
            break
        path = files[i]
        try:
            with _own_pixel_cap(), Image.open(path) as im:  # PIL's guard would print two lines, or refuse first
                if im.width * im.height > max_pixels:
                    raise MixrankError(_bomb(path, im.width, im.height, max_pixels))
                x = transform(im.convert("RGB"))
        except MixrankError:
            raise
        except Exception as e:  # PIL raises many types for bad files
            out.skipped.append((str(path), f"{type(e).__name__}: {e}"))
            continue
        current.append(x)
        out.files.append(str(path))
        if labels is not None:
            out.labels.append(labels[i])
        if len(current) == batch_size:
            out.batches.append(torch.stack(current))
            current = []
    if current:
        out.batches.append(torch.stack(current))
    if not out.files:
        raise MixrankError(
            f"no usable image in {root}: {len(files)} image file(s) found, "
            f"{len(out.skipped)} unreadable"
        )
    return out


@contextlib.contextmanager
def _own_pixel_cap():
    """PIL's decompression-bomb guard switched off while an image is opened: mixrank checks
    the declared size itself (``max_pixels``) before anything is decoded, with one line."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _bomb(path, width: int, height: int, max_pixels: int) -> str:
    return (f"{path} declares {width}x{height} = {width * height / 1e6:.0f} Mpixel, over the cap of "
            f"{max_pixels / 1e6:.0f} Mpixel (a decompression bomb?); raise the cap with --max-image-pixels if the "
            "image is genuine")


def image_csv(csv_path: str | os.PathLike, model: nn.Module | None = None, count: int | None = None,
              seed: int = 0, batch_size: int = 32, transform=None,
              max_pixels: int = MAX_IMAGE_PIXELS) -> ImageBatches:
    """Labelled images listed in ``csv_path``, a CSV of ``file,label`` rows (paths
    relative to the CSV; labels are class indices, integers >= 0). Rows whose file is
    missing or unreadable are skipped and counted (`ImageBatches.shortfall`). ``model``,
    ``count``, ``seed``, ``batch_size``, ``transform`` and ``max_pixels`` are as in
    `image_folder`.

    Raises:
        MixrankError: no CSV, a malformed row or label, no listed file that exists.
    """
    import csv

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MixrankError(f"CSV file {csv_path} does not exist")
    rows = []
    try:
        text = csv_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixrankError(f"{csv_path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(text.splitlines())
    i = 0
    while True:
        i += 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # a field past csv's 131,072-character limit, say
            raise MixrankError(f"{csv_path}:{i}: not a 'file,label' row ({e})") from None
        if not row or row[0].startswith("#") or (i == 1 and row[0].strip().lower() in ("file", "path")):
            continue
        if len(row) < 2:
            raise MixrankError(f"{csv_path}:{i}: expected 'file,label', got {row!r:.80}")
        lab = row[1].strip()
        if not re.fullmatch(r"[0-9]{1,9}", lab):  # "²".isdigit() is true, and int() refuses it
            raise MixrankError(f"{csv_path}:{i}: the label must be a class index (an integer >= 0), got "
                               f"{lab[:40]!r}{'...' if len(lab) > 40 else ''}")
        rows.append((row[0].strip(), lab))
    if not rows:
        raise MixrankError(f"{csv_path} lists no image")
    index = {lab: int(lab) for _, lab in rows}
    root = Path(tempfile.mkdtemp(prefix="mixrank-csv-"))
    missing = []
    try:
        # reuse the folder loader's error handling through symlinks in a flat folder
        for j, (f, lab) in enumerate(rows):
            src = (csv_path.parent / f).resolve()
            if not src.is_file():
                missing.append((str(csv_path.parent / f), "no such file"))
                continue
            (root / f"{j:07d}_{index[lab]}{src.suffix or '.img'}").symlink_to(src)
        if len(missing) == len(rows):
            raise MixrankError(f"none of the {len(rows)} files {csv_path} lists exists (first: {missing[0][0]})")
        out = image_folder(root, model, count, seed, batch_size, transform, max_pixels)
    finally:
        for p in root.iterdir():
            p.unlink()
        root.rmdir()
    out.labels = [int(Path(f).name.split("_")[1].split(".")[0]) for f in out.files]
    out.files = [str(csv_path.parent / rows[int(Path(f).name.split("_")[0])][0]) for f in out.files]
    out.classes = []
    out.skipped = missing + [(str(csv_path.parent / rows[int(Path(f).name.split("_")[0])][0]), why)
                             for f, why in out.skipped]
    out.found = len(rows)
    return out
