"""The paper's ImageNet protocol, for users who have ImageNet and network access.

Azizi, Nazemi, Pedram (2024) compress pretrained DeiT-T/S/B and ViT-B/L and report
ImageNet-1k top-1 (DeiT-B: -60 % parameters for < 1 % top-1). This script runs the same
protocol with mixrank: timm's pretrained weights, calibration images from the ImageNet
training set, top-1/top-5 on the validation set (class-per-folder layout, or a CSV of
file,label rows), for the original, mixrank and the baselines at equal budget.

    python benchmarks/imagenet.py --train /data/imagenet/train --val /data/imagenet/val \
        [--models deit_base_patch16_224] [--keeps 0.4] [--calib 256] [--device cuda]

Needs: network access to timm's model hub (or --checkpoint-dir with <model>.safetensors
files), ImageNet train (calibration) and val folders. Without them it says what is missing
and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PAPER_MODELS = {  # model -> keep fractions of the block Linear parameters to evaluate
    "deit_tiny_patch16_224": (0.6, 0.5),
    "deit_small_patch16_224": (0.6, 0.5),
    "deit_base_patch16_224": (0.5, 0.4),
    "vit_base_patch16_224": (0.5, 0.4),
    "vit_large_patch16_224": (0.5, 0.4),
}


def main() -> int:
    from mixrank._models import load_model
    from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model, image_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", help="ImageNet train folder (class-per-folder) for calibration")
    ap.add_argument("--val", help="ImageNet val folder (class-per-folder)")
    ap.add_argument("--val-csv", help="or a CSV of file,label rows")
    ap.add_argument("--models", default=",".join(PAPER_MODELS))
    ap.add_argument("--keeps", default=None, help="override the keep fractions, comma-separated")
    ap.add_argument("--methods", default="mixrank,whiten,svd")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val-count", type=int, default=None, help="evaluate on a subset")
    ap.add_argument("--checkpoint-dir", help="folder of <model>.safetensors instead of the hub")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/imagenet.json")
    args = ap.parse_args()
    missing = []
    if not args.train or not Path(args.train).is_dir():
        missing.append("--train: the ImageNet training folder (calibration images)")
    if not (args.val and Path(args.val).is_dir()) and not (args.val_csv and Path(args.val_csv).is_file()):
        missing.append("--val (class-per-folder) or --val-csv: the ImageNet validation set")
    if missing:
        print("benchmarks/imagenet.py needs:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    results = []
    for name in args.models.split(","):
        ckpt = Path(args.checkpoint_dir) / f"{name}.safetensors" if args.checkpoint_dir else None
        try:
            model = load_model(name, pretrained=ckpt is None, checkpoint=ckpt).to(args.device)
        except MixrankError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        calib = image_folder(args.train, model, count=args.calib, batch_size=32)
        from mixrank.compress import image_csv

        val = image_csv(args.val_csv, model, count=args.val_count, batch_size=64) if args.val_csv else \
            image_folder(args.val, model, count=args.val_count, batch_size=64)

        def top1(m, val=val):
            m.eval()
            hit = tot = 0
            with torch.no_grad():
                for i, b in enumerate(val.batches):
                    y = torch.tensor(val.labels[i * 64:(i + 1) * 64], device=args.device)
                    hit += int((m(b.to(args.device)).argmax(-1) == y).sum())
                    tot += len(y)
            return hit / tot

        base = top1(model)
        keeps = [float(k) for k in args.keeps.split(",")] if args.keeps else PAPER_MODELS.get(name, (0.5,))
        for keep in keeps:
            for method in args.methods.split(","):
                f = compress_model(model, calib.batches, CompressConfig(method=method, keep=keep,
                                                                        device=args.device))
                acc = top1(apply_factors(model, f))
                r = {"model": name, "keep": keep, "method": method, "top1_original": base,
                     "top1": acc, "params": f.plan["totals"]["model_params_after"],
                     "params_original": f.plan["totals"]["model_params_before"]}
                results.append(r)
                print(json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
