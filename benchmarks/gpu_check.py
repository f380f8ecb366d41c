"""GPU timings: the compression itself and the factored PyTorch model (one script).

On a CUDA machine: compresses deit_base_patch16_224 (random weights) with 128
photographs at 224x224 on the GPU and prints each stage's time, then times the
original and the factored model at batch 1 and 32 in fp32 and bf16 autocast with
CUDA events, interleaved, and prints the speedups and the factored model's
parameter and memory savings.

    python benchmarks/gpu_check.py [--model deit_base_patch16_224] [--images 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress_speed import make_photos  # noqa: E402


def time_pair(models: dict, x: torch.Tensor, dtype, rounds: int = 20, iters: int = 10) -> dict:
    """Median latency (ms) per model, interleaved rounds, CUDA events (or perf_counter)."""
    cuda = x.is_cuda
    lat = {n: [] for n in models}
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for m in models.values():
            for _ in range(5):
                m(x)
        for r in range(rounds):
            for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
                if cuda:
                    torch.cuda.synchronize()
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    for _ in range(iters):
                        models[n](x)
                    e.record()
                    torch.cuda.synchronize()
                    lat[n].append(s.elapsed_time(e) / iters)
                else:
                    t = time.perf_counter()
                    for _ in range(iters):
                        models[n](x)
                    lat[n].append((time.perf_counter() - t) * 1e3 / iters)
    return {n: statistics.median(v) for n, v in lat.items()}


def main() -> None:
    import timm

    from mixrank.compress import CompressConfig, apply_factors, compress_model, image_folder

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--search-seconds", type=float, default=60.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "model": args.model, "keep": args.keep}
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), args.images)
        data = image_folder(tmp, model, count=args.images, batch_size=32)
    for method in ("whiten", "mixrank"):
        search = {"search_seconds": args.search_seconds} if method == "mixrank" else {}  # whiten has no search
        cfg = CompressConfig(method=method, keep=args.keep, device=args.device, **search)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f = compress_model(model, data.batches, cfg, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[f"compress_{method}"] = {"total_s": time.perf_counter() - t0, **f.plan["timings"],
                                     "evaluations": f.plan["allocation"]["evaluations"],
                                     "stopped": f.plan["allocation"]["stopped"],
                                     "variant": f.plan["allocation"]["refinement"]["chosen"],
                                     "uniform_score": f.plan["allocation"]["uniform_score"],
                                     "final_score": f.plan["allocation"]["refinement"]["score"]}
        print(method, json.dumps(out[f"compress_{method}"]), flush=True)
    small = apply_factors(model, f).eval()
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in small.parameters())
    out["params"] = {"original": n0, "factored": n1, "ratio": n1 / n0}
    out["latency_ms"] = {}
    for bs in (1, 32):
        x = torch.randn(bs, 3, 224, 224, device=dev)
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if dev.type == "cpu" and dt != torch.float32:
                continue
            r = time_pair({"original": model, "factored": small}, x, dt)
            r["speedup"] = r["original"] / r["factored"]
            out["latency_ms"][f"b{bs}_{name}"] = r
            print(f"batch {bs} {name}: original {r['original']:.3f} ms, factored "
                  f"{r['factored']:.3f} ms, speedup {r['speedup']:.2f}x", flush=True)
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
