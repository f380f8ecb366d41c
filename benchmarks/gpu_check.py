"""GPU check, one script for a lent GPU: the compression itself, the factored PyTorch
model, and every engine this machine has.

On a CUDA machine: compresses deit_base_patch16_224 (random weights) with 128 photographs
at 224x224 on the GPU (``whiten`` and ``mixrank`` at ``--effort``, default balanced; issue
13's target: balanced <= 60 s) and prints each stage's time; then times the original and
the factored model at batch 1 and 32 in fp32, fp16 and bf16 autocast, eager and under
``torch.compile``, with CUDA events, interleaved; then onnxruntime's CUDA provider and
TensorRT on the exported and rewritten ONNX files where they are installed. The last lines
say plainly what could not run here and why.

    python benchmarks/gpu_check.py [--model deit_base_patch16_224] [--images 128] [--out DIR]
        [--effort balanced] [--no-compile]
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
    ap.add_argument("--effort", default="balanced")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    not_run: list[str] = []
    dev = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "model": args.model, "keep": args.keep}
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), args.images)
        data = image_folder(tmp, model, count=args.images, batch_size=32)
    for method in ("whiten", "mixrank"):
        cfg = CompressConfig(method=method, keep=args.keep, device=args.device, effort=args.effort)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f = compress_model(model, data.batches, cfg, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[f"compress_{method}"] = {"total_s": time.perf_counter() - t0, **f.timings,
                                     "evaluations": f.plan["allocation"]["evaluations"],
                                     "stopped": f.plan["allocation"]["stopped"],
                                     "variant": f.plan["allocation"]["refinement"]["chosen"],
                                     "uniform_score": f.plan["allocation"]["uniform_score"],
                                     "final_score": f.plan["allocation"]["refinement"]["score"]}
        print(method, json.dumps(out[f"compress_{method}"]), flush=True)
    if dev.type == "cuda" and args.model == "deit_base_patch16_224" and args.images == 128:
        t = out["compress_mixrank"]["total_s"]
        print(f"target: deit_base, 128 images, {args.effort} on the GPU <= 60 s: {t:.1f} s "
              f"{'PASS' if t <= 60 else 'FAIL'}")
    small = apply_factors(model, f).eval()
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in small.parameters())
    out["params"] = {"original": n0, "factored": n1, "ratio": n1 / n0}
    out["latency_ms"] = {}
    compiled = {}
    if args.no_compile:
        not_run.append("torch.compile: left out (--no-compile)")
    else:
        try:
            compiled = {"original": torch.compile(model), "factored": torch.compile(small)}
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            not_run.append(f"torch.compile: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    dtypes = [("fp32", torch.float32)] + ([("fp16", torch.float16), ("bf16", torch.bfloat16)]
                                           if dev.type == "cuda" else [])
    if dev.type != "cuda":
        not_run.append("fp16/bf16 latency: no CUDA device (CPU autocast timings would say nothing about a GPU)")
    for bs in (1, 32):
        x = torch.randn(bs, 3, 224, 224, device=dev)
        for name, dt in dtypes:
            for mode, pair in (("eager", {"original": model, "factored": small}), ("compile", compiled)):
                if not pair:
                    continue
                try:
                    r = time_pair(pair, x, dt)
                except Exception as e:  # noqa: BLE001 - a compile failure is a finding, not a crash
                    not_run.append(f"{mode} {name} batch {bs}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                r["speedup"] = r["original"] / r["factored"]
                out["latency_ms"][f"b{bs}_{name}_{mode}"] = r
                print(f"batch {bs} {name} {mode}: original {r['original']:.3f} ms, factored "
                      f"{r['factored']:.3f} ms, speedup {r['speedup']:.2f}x", flush=True)
    out["engines"] = engines(model, f, dev, not_run)
    out["not_run"] = not_run
    print(json.dumps(out, indent=1))
    print("\ncould not run here:" if not_run else "\neverything ran")
    for line in not_run:
        print(f"  - {line}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(out, indent=1))


def engines(model, factors, dev, not_run: list[str]) -> dict:
    """onnxruntime's CUDA provider and TensorRT on the original and rewritten ONNX, where
    this machine has them (each missing one is added to ``not_run`` with the reason)."""
    from mixrank.compress import MixrankError
    from mixrank.engines import OrtSettings, TimingConfig, measure
    from mixrank.exporter import export_onnx, rewrite_onnx

    res = {}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    have_trt = True
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        have_trt = False
        not_run.append("TensorRT: the tensorrt package is not installed")
    if "CUDAExecutionProvider" not in providers:
        not_run.append(f"onnxruntime CUDA provider: this onnxruntime has only {providers or 'nothing'} "
                       "(needs onnxruntime-gpu: mixrank[gpu])")
    if dev.type != "cuda" or not (have_trt or "CUDAExecutionProvider" in providers):
        return res
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x = torch.randn(2, 3, 224, 224)
        export_onnx(model.cpu(), x, tmp / "o.onnx")
        model.to(dev)
        if "CUDAExecutionProvider" in providers:
            rewrite_onnx(tmp / "o.onnx", factors, tmp / "c.onnx")
            try:
                m = measure(tmp / "o.onnx", tmp / "c.onnx", (1, 32), OrtSettings(provider="cuda"),
                            timing=TimingConfig(max_seconds=20), progress=False)
                res["onnxruntime_cuda"] = {str(t["batch"]): {"speedup": t["speedup"]} for t in m["throughput"]}
                print("onnxruntime cuda:", json.dumps(res["onnxruntime_cuda"]), flush=True)
            except MixrankError as e:
                not_run.append(f"onnxruntime CUDA provider: {e}")
        if have_trt:
            from mixrank.engines import TrtSettings, build_engine

            rewrite_onnx(tmp / "o.onnx", factors, tmp / "c.trt.onnx", target="tensorrt")
            s = TrtSettings(precision="fp16", opt_batch=32, max_batch=32)
            try:
                for tag, g in (("o", "o.onnx"), ("c", "c.trt.onnx")):
                    build_engine(tmp / g, tmp / f"{tag}.engine", s)
                m = measure(tmp / "o.engine", tmp / "c.engine", (1, 32), s, engine="tensorrt",
                            graphs=(tmp / "o.onnx", tmp / "c.trt.onnx"), timing=TimingConfig(max_seconds=20),
                            progress=False)
                res["tensorrt_fp16"] = {str(t["batch"]): {"speedup": t["speedup"]} for t in m["throughput"]}
                res["tensorrt_device_memory"] = {k: m["footprint"][k].get("device_memory_bytes")
                                                 for k in ("original", "compressed")}
                print("tensorrt fp16:", json.dumps(res["tensorrt_fp16"]), flush=True)
            except MixrankError as e:
                not_run.append(f"TensorRT: {e}")
    return res


if __name__ == "__main__":
    main()
