"""onnxruntime footprint and speed of compressed DeiT models, side by side.

For deit_small_patch16_224 and deit_base_patch16_224 (random weights: speed only),
compressed at keep=0.4 of the block Linear parameters (activation-aware factors at a
uniform rank fraction, 16 calibration photographs), on this machine's CPU cores:

- initializer bytes of the compressed graph vs 0.4 x block Linear bytes + the rest
  (target: 0.4 +- 0.02 on the block part);
- batch 32 and batch 1 speedup vs the ideal speedup from the two graphs' FLOPs
  (target: >= 0.85 x ideal at batch 32);
- peak RSS saved vs weight bytes saved (target: >= 70 %).

Prints measured ratios; asserts nothing.

    python benchmarks/engines_speed.py [--models deit_small_patch16_224,deit_base_patch16_224]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress_speed import make_photos  # noqa: E402


def main() -> None:
    import timm

    from mixrank.compress import CompressConfig, compress_model, image_folder, save_factors
    from mixrank.engines import OrtSettings, TimingConfig, measure
    from mixrank.exporter import export_onnx, rewrite_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224")
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--seconds", type=float, default=60.0, help="time limit per batch size")
    ap.add_argument("--out", default=None, help="keep artifacts and results here")
    args = ap.parse_args()
    lines = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(args.out or tmp) / name
            tmp.mkdir(parents=True, exist_ok=True)
            photos = tmp / "photos"
            photos.mkdir(exist_ok=True)
            make_photos(photos, 16)
            data = image_folder(photos, model, batch_size=8)
            f = compress_model(model, data.batches, CompressConfig(method="whiten", keep=args.keep),
                               progress=False)
            save_factors(f, tmp / "f.safetensors")
            export_onnx(model, data.batches[0][:1], tmp / "orig.onnx")
            rewrite_onnx(tmp / "orig.onnx", f, tmp / "comp.onnx")
            res = measure(tmp / "orig.onnx", tmp / "comp.onnx", (1, 32), OrtSettings(),
                          timing=TimingConfig(max_seconds=args.seconds, max_rounds=200))
            (tmp / "measure.json").write_text(json.dumps(res, indent=1))
        t = f.plan["totals"]
        fo, fc = res["footprint"]["original"], res["footprint"]["compressed"]
        rest = fo["initializer_bytes"] - t["bytes_before"]
        block_ratio = (fc["initializer_bytes"] - rest) / t["bytes_before"]
        lines.append(f"\n{name} (keep={args.keep}, {torch.get_num_threads()} threads)")
        lines.append(f"  initializer bytes {fo['initializer_bytes']:,} -> {fc['initializer_bytes']:,}; "
                     f"block Linear part {block_ratio:.4f}x (target 0.40 +- 0.02: "
                     f"{'PASS' if abs(block_ratio - args.keep) <= 0.02 else 'FAIL'})")
        for th in res["throughput"]:
            frac = th["speedup"] / th["ideal_speedup"]
            sp = th["speedup_spread"]
            lines.append(f"  batch {th['batch']}: speedup {th['speedup']:.3f}x (rounds p25-p75 "
                         f"{sp['p25']:.2f}-{sp['p75']:.2f}), FLOP ideal {th['ideal_speedup']:.3f}x -> "
                         f"{frac:.2f} of ideal ({'PASS' if frac >= 0.85 else 'FAIL'} target >= 0.85); "
                         f"p50 {th['sessions']['original']['p50_ms']:.1f} -> "
                         f"{th['sessions']['compressed']['p50_ms']:.1f} ms, {th['rounds']} rounds, "
                         f"{th['stopped']}")
        saved_w = fo["initializer_bytes"] - fc["initializer_bytes"]
        saved_rss = fo["peak_rss_bytes"] - fc["peak_rss_bytes"]
        lines.append(f"  peak RSS {fo['peak_rss_bytes'] / 1e6:.0f} MB -> "
                     f"{fc['peak_rss_bytes'] / 1e6:.0f} MB: "
                     f"saved {saved_rss / 1e6:.0f} MB of {saved_w / 1e6:.0f} MB weight bytes saved "
                     f"({saved_rss / saved_w:.2f}; {'PASS' if saved_rss >= 0.7 * saved_w else 'FAIL'} "
                     f"target >= 0.70)")
        print("\n".join(lines[-5:]), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
