"""Footprint, throughput and fidelity of two ONNX models measured side by side."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ._errors import MixrankError
from ._ort import OrtSettings, ort_session


def onnx_params(onnx_path: str | os.PathLike) -> dict:
    """Parameters (float initializer elements), initializer bytes, file bytes."""
    from onnx import numpy_helper

    from exporter import load_onnx, onnx_file_bytes

    model = load_onnx(onnx_path)
    params = nbytes = 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        nbytes += a.nbytes
        if a.dtype.kind == "f":
            params += a.size
    for n in model.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    a = numpy_helper.to_array(at.t)
                    nbytes += a.nbytes
                    params += a.size if a.dtype.kind == "f" else 0
    return {"params": int(params), "initializer_bytes": int(nbytes),
            "file_bytes": int(onnx_file_bytes(onnx_path))}


def matmul_flops(onnx_path: str | os.PathLike, batch: int) -> int:
    """FLOPs (2 per multiply-add) of every MatMul, Gemm and Conv at ``batch``, from
    ONNX shape inference with the batch dimension fixed."""
    from onnx import shape_inference

    from exporter import load_onnx

    model = load_onnx(onnx_path)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                           for d in vi.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    flops = 0
    for n in model.graph.node:
        out = shapes.get(n.output[0])
        if not out or any(d is None for d in out):
            if n.op_type in ("MatMul", "Gemm", "Conv"):
                raise MixrankError(f"cannot infer the shape of {n.name or n.op_type}'s output")
            continue
        if n.op_type in ("MatMul", "Gemm"):
            a = shapes.get(n.input[0])
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a else a[-1]
            flops += 2 * int(np.prod(out)) * int(k)
        elif n.op_type == "Conv":
            w = shapes.get(n.input[1])
            flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return flops


def input_spec(sess, batch: int) -> tuple[str, list[int], type]:
    inp = sess.get_inputs()[0]
    shape = [batch if (i == 0 and not isinstance(d, int)) else d for i, d in enumerate(inp.shape)]
    if any(not isinstance(d, int) for d in shape):
        raise MixrankError(f"input {inp.name} has symbolic dimensions {inp.shape} beyond the batch")
    if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] != batch:
        raise MixrankError(f"{inp.name} has a fixed batch of {inp.shape[0]}; cannot run batch {batch}")
    dtype = np.float16 if "float16" in inp.type else np.float32
    return inp.name, shape, dtype


_RSS_CHILD = r"""
import json, sys, numpy as np, onnxruntime as ort
def status(key):  # VmHWM is this process image's peak (ru_maxrss survives exec from the parent)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
path, batch, threads, opt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
base = status("VmRSS")
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt]
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
shape = [batch if not isinstance(d, int) else d for d in i.shape]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float16 if "float16" in i.type else np.float32)
s.run(None, {i.name: x})
print(json.dumps({"peak_rss_bytes": status("VmHWM"), "baseline_rss_bytes": base}))
"""


def peak_rss(onnx_path: str | os.PathLike, batch: int = 1,
             settings: OrtSettings | None = None) -> dict:
    """Peak resident memory of a fresh process that loads the model in onnxruntime and
    runs one batch (measured in a child process so runs do not contaminate each other);
    also the process's resident memory before loading the model."""
    s = settings or OrtSettings()
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(onnx_path), str(batch),
                          str(s.threads), s.optimization], capture_output=True, text=True)
    if out.returncode != 0:
        raise MixrankError(f"measuring memory of {onnx_path} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class TimingConfig:
    warmup: int = 3
    min_rounds: int = 5
    max_rounds: int = 40
    iters_per_round: int = 5
    max_seconds: float = 30.0
    stable_rel: float = 0.02


def throughput(sessions: dict, batch: int, cfg: TimingConfig | None = None,
               progress: bool = True) -> dict:
    """Latency of each session at ``batch``, interleaved in rounds (the order of the
    sessions alternates every round), until the medians are stable or the time
    limit is hit. CPU timing uses ``time.perf_counter`` (monotonic).

    Returns per session p50/p90/p99 (ms) and images/s, and for the first two
    sessions the speedup (p50 ratio) with the spread of the per-round ratios.
    """
    cfg = cfg or TimingConfig()
    names = list(sessions)
    feeds = {}
    for n in names:
        iname, shape, dtype = input_spec(sessions[n], batch)
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        feeds[n] = {iname: x}
        for _ in range(cfg.warmup):
            sessions[n].run(None, feeds[n])
    lat = {n: [] for n in names}
    round_medians = {n: [] for n in names}
    t0 = time.perf_counter()
    prev = None
    bar = tqdm(total=cfg.max_rounds, desc=f"bench b{batch}", unit="round", disable=not progress)
    stopped = "max_rounds"
    for r in range(cfg.max_rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times = []
            for _ in range(cfg.iters_per_round):
                t = time.perf_counter()
                sessions[n].run(None, feeds[n])
                times.append(time.perf_counter() - t)
            lat[n] += times
            round_medians[n].append(statistics.median(times))
        bar.update(1)
        meds = {n: statistics.median(lat[n]) for n in names}
        if r + 1 >= cfg.min_rounds and prev is not None and all(
                abs(meds[n] - prev[n]) <= cfg.stable_rel * prev[n] for n in names):
            stopped = "stable"
            break
        prev = meds
        if time.perf_counter() - t0 > cfg.max_seconds:
            stopped = "time_limit"
            break
    bar.close()
    res = {"batch": batch, "stopped": stopped, "rounds": len(round_medians[names[0]]),
           "sessions": {}}
    for n in names:
        a = np.array(lat[n]) * 1e3
        res["sessions"][n] = {
            "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "images_per_s": batch / (float(np.percentile(a, 50)) / 1e3),
            "iterations": len(a), "latencies_ms": [round(float(v), 4) for v in a],
        }
    if len(names) >= 2:
        o, c = names[0], names[1]
        ratios = np.array(round_medians[o]) / np.array(round_medians[c])
        res["speedup"] = res["sessions"][o]["p50_ms"] / res["sessions"][c]["p50_ms"]
        res["speedup_spread"] = {"min": float(ratios.min()), "max": float(ratios.max()),
                                 "p25": float(np.percentile(ratios, 25)),
                                 "p75": float(np.percentile(ratios, 75))}
    return res


def _run_all(sess, x: np.ndarray, batch: int) -> np.ndarray:
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
    batch = fixed or batch
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch].astype(dtype)
        n = len(chunk)
        if fixed and n < fixed:  # a fixed-batch model: pad the last chunk, keep n rows
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), dtype)])
        outs.append(sess.run(None, {inp.name: chunk})[0][:n])
    return np.concatenate(outs).astype(np.float32)


def fidelity(orig, comp, inputs: np.ndarray, labels: np.ndarray | None = None,
             batch: int = 32) -> dict:
    """Compressed vs original on the same inputs: max abs/rel error, mean cosine of the
    logits, top-1 agreement; top-1/top-5 accuracy of both when labels are given."""
    a, b = _run_all(orig, inputs, batch), _run_all(comp, inputs, batch)
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    diff = np.abs(a2 - b2)
    cos = (a2 * b2).sum(1) / np.maximum(np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1), 1e-300)
    res = {"samples": int(len(a)), "max_abs": float(diff.max()),
           "max_rel": float(diff.max() / max(np.abs(a2).max(), 1e-12)),
           "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           "top1_agreement": float((a2.argmax(1) == b2.argmax(1)).mean())}
    if labels is not None:
        labels = np.asarray(labels)
        for tag, out in (("original", a2), ("compressed", b2)):
            top5 = np.argsort(-out, axis=1)[:, :5]
            res[f"top1_{tag}"] = float((top5[:, 0] == labels).mean())
            res[f"top5_{tag}"] = float((top5 == labels[:, None]).any(1).mean())
        res["top1_drop"] = res["top1_original"] - res["top1_compressed"]
    return res


def measure(original: str | os.PathLike, compressed: str | os.PathLike,
            batches: tuple[int, ...] = (1, 32), settings: OrtSettings | None = None,
            inputs: np.ndarray | None = None, labels: np.ndarray | None = None,
            timing: TimingConfig | None = None, progress: bool = True) -> dict:
    """Everything about two ONNX models on onnxruntime in one run: footprint (with peak
    RSS from child processes), throughput per batch size (interleaved), fidelity."""
    s = settings or OrtSettings()
    res = {"engine": "onnxruntime", "settings": s.to_dict(), "footprint": {}, "throughput": [],
           "flops": {}}
    for tag, p in (("original", original), ("compressed", compressed)):
        if not Path(p).is_file():
            raise MixrankError(f"ONNX file {p} does not exist")
        res["footprint"][tag] = {**onnx_params(p), **peak_rss(p, 1, s)}
        res["flops"][tag] = {str(b): matmul_flops(p, b) for b in batches}
    sessions = {"original": ort_session(original, s), "compressed": ort_session(compressed, s)}
    for b in batches:
        res["throughput"].append(throughput(sessions, b, timing, progress))
    for t in res["throughput"]:
        b = str(t["batch"])
        t["ideal_speedup"] = res["flops"]["original"][b] / res["flops"]["compressed"][b]
    if inputs is not None:
        res["fidelity"] = fidelity(sessions["original"], sessions["compressed"], inputs, labels)
    return res
