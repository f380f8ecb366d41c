"""Time and memory of compressing deit_base_patch16_224 (or another timm model) on this machine.

Calibration with 128 real photographs (scikit-image's sample photographs, random
crops and flips) at 224x224 through the real image-folder loader and the model's own
preprocessing; random initialisation (timing only). Prints wall time and peak
resident memory per stage. Targets (issue 13): deit_base, 128 images, ``balanced``
within 15 minutes and under 6 GB on 2 CPU cores; vit_large_patch16_224 with 64 images
completes under 16 GB.

    python benchmarks/compress_speed.py [--model deit_base_patch16_224] [--images 128]
        [--effort balanced] [--max-memory 2GB]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class RssSampler(threading.Thread):
    """Samples this process's resident set size every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.page = 4096

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.rss()))
            time.sleep(0.02)

    def peak(self, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)


def make_photos(folder: Path, count: int, seed: int = 0) -> None:
    from skimage import data

    rng = random.Random(seed)
    srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
            np.stack([data.camera()] * 3, -1), np.stack([data.brick()] * 3, -1)]
    for i in range(count):
        img = srcs[i % len(srcs)]
        h, w = img.shape[:2]
        s = rng.randint(min(h, w) // 3, min(h, w))
        y, x = rng.randint(0, h - s), rng.randint(0, w - s)
        crop = img[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:04d}.png")


def main() -> None:
    import timm

    from mixrank.compress import CompressConfig, compress_model, image_folder

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--method", default="mixrank")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--effort", default="balanced")
    ap.add_argument("--max-memory", default=None, help="spill Grams beyond this size to disk, e.g. 2GB")
    ap.add_argument("--max-rss-gb", type=float, default=6.0, help="the peak-memory target to check")
    args = ap.parse_args()

    sampler = RssSampler()
    sampler.start()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), args.images)
        t_load = time.perf_counter()
        data = image_folder(tmp, model, count=args.images, batch_size=16)
        t_loaded = time.perf_counter()
    cfg = CompressConfig(method=args.method, keep=args.keep, device=args.device, effort=args.effort,
                         max_memory=args.max_memory)
    t0 = time.perf_counter()
    factors = compress_model(model, data.batches, cfg, source={"model": args.model})
    t1 = time.perf_counter()
    sampler.stop.set()
    sampler.join()

    tm = factors.timings
    bounds = [("load images", t_load, t_loaded)]
    c = t0
    for stage in ("calibrate_s", "factor_s", "allocate_s", "refine_s"):
        bounds.append((stage[:-2], c, c + tm[stage]))
        c += tm[stage]
    bounds.append(("write plan", c, t1))
    print(f"\n{args.model}: {args.images} images, keep={args.keep}, method={args.method}, effort={args.effort}, "
          f"max_memory={args.max_memory}, threads={torch.get_num_threads()}, device={args.device or 'cpu'}")
    print(f"{'stage':<14}{'seconds':>10}{'peak RSS (GB)':>16}")
    for name, a, b in bounds:
        print(f"{name:<14}{b - a:>10.1f}{sampler.peak(a, b) / 1e9:>16.2f}")
    total = t1 - t0
    peak = sampler.peak(t_start, t1)
    print(f"{'compress total':<14}{total:>10.1f}{peak / 1e9:>16.2f}")
    print(f"target: compress total <= 900 s -> {'PASS' if total <= 900 else 'FAIL'}; "
          f"peak RSS < {args.max_rss_gb:g} GB -> {'PASS' if peak < args.max_rss_gb * 1e9 else 'FAIL'}")
    alloc = factors.plan["allocation"]
    print(f"allocation: {alloc['evaluations']} candidates scored, uniform {alloc['uniform_score']:.4g}"
          f" -> chosen {alloc['chosen_score']:.4g}; {factors.summary()}")


if __name__ == "__main__":
    main()
