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
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from mixrank.core import Record, import_onnxruntime, is_number
from mixrank.exporter import load_onnx, onnx_file_bytes, output_agreement, topk_accuracy

from ._errors import MixrankError
from .runners import RUNNERS, SEQ_LEN, Runner, check_inputs, make_runner, random_feeds, run_all


def _int_scales(node, users: dict, made: dict, consts) -> set[str]:
    """The constants that scale the int32 output of a ``MatMulInteger``/``ConvInteger``
    ``node``: the inputs of the ``Mul`` nodes after its ``Cast``, and of the ``Mul`` that makes
    their other operand (``x_scale · w_scale``, quantize_dynamic's and mixrank's dynamic form),
    whatever they are named. ``users``/``made``: each tensor's consumers and producer."""
    out: set[str] = set()
    for cast in (c for c in users.get(node.output[0], []) if c.op_type == "Cast"):
        for mul in (m for m in users.get(cast.output[0], []) if m.op_type == "Mul"):
            for i in mul.input:
                src = made.get(i)
                ins = [i, *(src.input if src is not None and src.op_type == "Mul" else [])]
                out.update(x for x in ins if x in consts)
    return out


def onnx_params(onnx_path: str | os.PathLike) -> dict:
    """Parameters, initializer bytes, file bytes. Parameters are weight values: float
    constants, plus the logical K·N weights of each quantized weight (``MatMulNBits``
    codes, ``DequantizeLinear`` inputs, ``MatMulInteger`` weights, and a MatMul weight
    computed from constants, the expanded form), whose scales and zero points are not
    parameters."""
    from onnx import numpy_helper

    model = load_onnx(onnx_path)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(at.t)
    quant_aux, logical = set(), 0
    nodes = model.graph.node
    made = {o: n for n in nodes for o in n.output}
    users: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for n in nodes:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            logical += attrs["K"] * attrs["N"]
            quant_aux.update(n.input[1:4])
        elif n.op_type == "DequantizeLinear" and n.input[0] in consts:
            logical += consts[n.input[0]].size
            quant_aux.update(n.input)
        elif n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger") and n.input[1] in consts:
            # an int8 weight; its zero point, and its scale (an input of this node, or a Mul after it) are not
            # parameters
            logical += consts[n.input[1]].size
            aux = n.input[2:4] if n.op_type == "DynamicQuantizeMatMul" else n.input[3:4]
            quant_aux.update([*aux, *_int_scales(n, users, made, consts)])
    folded, aux = _folded_weights(model, consts)
    logical += folded
    quant_aux |= aux
    params = logical + sum(a.size for name, a in consts.items() if a.dtype.kind == "f" and name not in quant_aux)
    nbytes = sum(t.raw_data and len(t.raw_data) or consts[t.name].nbytes for t in model.graph.initializer)
    nbytes += sum(a.nbytes for name, a in consts.items() if name not in {t.name for t in model.graph.initializer})
    return {"params": int(params), "initializer_bytes": int(nbytes),
            "file_bytes": int(onnx_file_bytes(onnx_path))}


def _folded_weights(model, consts: dict) -> tuple[int, set[str]]:
    """(values, constants) of the MatMul weights a graph computes from constants alone
    (what an engine folds at load: the expanded integer form, ``Cast`` of float16): K·N
    per weight, and the constants they are computed from (codes, scales, zero points,
    shapes)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    sites = [n.input[1] for n in model.graph.node
             if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] not in consts
             and n.input[1] in producers]
    found: dict[str, set[str]] = {}
    for w in sites:
        leaves, todo, seen = set(), [w], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in consts:
                leaves.add(t)
            elif t in producers and producers[t].input:
                todo.extend(i for i in producers[t].input if i)
            else:  # a graph input, or a node with no inputs that is not a constant
                leaves = None
                break
        if leaves:
            found[w] = leaves
    if not found:
        return 0, set()
    shapes = _inferred_shapes(model, False)
    values = 0
    for w in found:
        shape = shapes.get(w)
        if not shape or None in shape:
            raise MixrankError(f"cannot infer the shape of the MatMul weight {w}")
        values += int(np.prod(shape))
    return values, set().union(*found.values())


def matmul_flops(onnx_path: str | os.PathLike, batch: int, seq_len: int = SEQ_LEN) -> int:
    """FLOPs (2 per multiply-add) of every MatMul, Gemm, Conv and quantized form of them of the ONNX
    file ``onnx_path`` at ``batch`` (a text model's sequence axis at ``seq_len`` tokens),
    from shape inference with the dynamic dimensions fixed (onnxruntime's symbolic shape
    inference where the graph has onnxruntime's own operators, or where onnx's leaves a
    MatMul's shape unknown)."""
    model = load_onnx(onnx_path)
    for inp in model.graph.input:
        for j, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = batch if j == 0 else seq_len
    shapes = _inferred_shapes(model, any(n.domain == "com.microsoft" for n in model.graph.node))
    if any(not shapes.get(n.output[0]) or None in shapes[n.output[0]] for n in model.graph.node
           if n.op_type in MATMUL_OPS):
        shapes = _inferred_shapes(model, True)  # e.g. BERT's position ids, sliced to a computed length
    flops = 0
    for n in model.graph.node:
        out = shapes.get(n.output[0])
        if not out or any(d is None for d in out):
            if n.op_type in MATMUL_OPS:
                raise MixrankError(f"cannot infer the shape of {n.name or n.op_type}'s output")
            continue
        if n.op_type == "MatMulNBits":
            k = next(at.i for at in n.attribute if at.name == "K")
            flops += 2 * int(np.prod(out)) * int(k)
        elif n.op_type in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul"):
            a = shapes.get(n.input[0])
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a else a[-1]
            flops += 2 * int(np.prod(out)) * int(k)
        elif n.op_type in ("Conv", "ConvInteger"):
            w = shapes.get(n.input[1])
            flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return flops


MATMUL_OPS = ("MatMul", "Gemm", "Conv", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger")


def _inferred_shapes(model, symbolic: bool) -> dict[str, list]:
    """Every tensor's shape (``None`` for an unknown dimension), by onnx's shape inference
    with data propagation, or by onnxruntime's symbolic shape inference (``symbolic``: it
    knows onnxruntime's own operators and follows computed shapes further)."""
    from onnx import shape_inference

    if symbolic:
        import_onnxruntime()
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    else:
        model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def peak_rss(artifact: str | os.PathLike, batch: int = 1, settings=None, engine: str = "onnxruntime",
             seq_len: int = SEQ_LEN) -> dict:
    """Peak resident memory of a fresh process that loads ``artifact`` with the
    ``engine`` runner and runs one batch (``python -m mixrank.engines._memprobe``; a child process
    so runs do not contaminate each other), the process's resident memory before
    loading, and what the engine reports about its own memory. ``settings``: the engine's
    (``None``: its defaults); ``seq_len``: a text model's tokens per input."""
    cls = RUNNERS[engine]
    s = settings or cls.settings_type()
    out = subprocess.run([sys.executable, "-m", "mixrank.engines._memprobe", engine, str(artifact), str(batch),
                          json.dumps(s.to_dict()), str(seq_len)], capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise MixrankError(f"measuring memory of {artifact} failed: {lines[-1] if lines else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class TimingConfig:
    warmup: int = 3
    min_rounds: int = 5
    max_rounds: int = 40
    iters_per_round: int = 5
    max_seconds: float = 30.0
    stable_rel: float = 0.02

    def __post_init__(self) -> None:
        for name in ("warmup", "min_rounds", "max_rounds", "iters_per_round"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise MixrankError(f"timing: {name} must be a whole number >= {0 if name == 'warmup' else 1}, "
                                   f"got {v!r}")
        for name in ("max_seconds", "stable_rel"):
            v = getattr(self, name)
            if not (is_number(v) and v > 0):
                raise MixrankError(f"timing: {name} must be a number > 0, got {v!r}"
                                   + (" (--seconds on the command line)" if name == "max_seconds" else ""))


def throughput(runners: dict[str, Runner], batch: int, cfg: TimingConfig | None = None,
               progress: bool = True, seq_len: int = SEQ_LEN) -> dict:
    """Latency of each runner at ``batch``, interleaved in rounds (the order of the
    runners alternates every round), until the medians are stable or the time
    limit is hit. Each runner times itself (`Runner.time`: the wall clock on the CPU,
    device timers on a GPU). ``cfg``: the `TimingConfig` (``None``: defaults); ``progress``:
    show a progress bar; ``seq_len``: a text model's tokens per input (random ids, no
    padding).

    Returns per runner p50/p90/p99 (ms) and images/s, and for the first two
    runners the speedup (p50 ratio) with the spread of the per-round ratios.
    """
    cfg = cfg or TimingConfig()
    names = list(runners)
    feeds = {}
    for n in names:
        feeds[n] = random_feeds(runners[n], batch, seq_len=seq_len)
        runners[n].time(feeds[n], cfg.warmup)
    lat = {n: [] for n in names}
    round_medians = {n: [] for n in names}
    t0 = time.perf_counter()
    prev = None
    bar = tqdm(total=cfg.max_rounds, desc=f"bench b{batch}", unit="round", disable=not progress)
    stopped = "max_rounds"
    for r in range(cfg.max_rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times = runners[n].time(feeds[n], cfg.iters_per_round)
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


def fidelity(orig: Runner, comp: Runner, inputs, labels: np.ndarray | None = None,
             batch: int = 32, output: str = "logits") -> dict:
    """Compressed (``comp``) vs original (``orig``) on the same inputs (an array, or a
    list of feeds), run in chunks of ``batch``: max abs/rel error, the mean, 5th
    percentile and least per-sample cosine; for ``output="logits"`` also top-1 agreement
    and the mean KL divergence of the softmax (original to compressed), and top-1/top-5
    accuracy of both when labels are given. ``output="embedding"``: a sentence embedding,
    compared by cosine alone."""
    a, b = run_all(orig, inputs, batch), run_all(comp, inputs, batch)
    res = output_agreement(a, b)
    if output == "embedding":
        res.pop("top1_agreement")
        return res
    if a.ndim == 2:
        res["logits_kl"] = _softmax_kl(a, b)
    if labels is not None:
        for tag, out in (("original", a), ("compressed", b)):
            acc = topk_accuracy(out, labels)
            res[f"top1_{tag}"], res[f"top5_{tag}"] = acc["top1"], acc["top5"]
        res["top1_drop"] = res["top1_original"] - res["top1_compressed"]
    return res


def _softmax_kl(a: np.ndarray, b: np.ndarray) -> float:
    """Mean KL(softmax(a) || softmax(b)) over the rows of two (N, classes) logits."""
    la = a - a.max(1, keepdims=True)
    la = la - np.log(np.exp(la).sum(1, keepdims=True))
    lb = b - b.max(1, keepdims=True)
    lb = lb - np.log(np.exp(lb).sum(1, keepdims=True))
    return float((np.exp(la) * (la - lb)).sum(1).mean())


@dataclass(eq=False)
class Measurement(Record):
    """Everything `measure` found, as the report stores it (``report["measurement"]``).

    Attributes:
        engine: the runner's name; settings: its settings (as a dict).
        footprint: per artifact (``original``, ``compressed``, each reference): parameters,
            initializer and file bytes, peak and baseline RSS, and what the engine reports.
        flops: per artifact, per batch size (as a string), MatMul FLOPs.
        throughput: per batch size, the interleaved timing (`throughput`) with its
            ``ideal_speedup`` (original FLOPs / compressed FLOPs).
        runner: the compressed artifact's runner's description (versions, settings).
        fidelity: compressed against original on the inputs (`fidelity`), when given.
        reference_fidelity: each reference against the original, when inputs are given.
        references: the references' names, when there are any.
        target: what produced the numbers (engine, provider, precision, device), when the
            caller records it; evaluation: where the fidelity inputs came from.
    """

    _optional: ClassVar[frozenset[str]] = frozenset({"fidelity", "reference_fidelity", "references", "target",
                                                     "evaluation"})

    engine: str
    settings: dict
    footprint: dict
    throughput: list
    flops: dict
    runner: dict
    fidelity: dict | None
    reference_fidelity: dict | None
    references: list | None
    target: dict | None
    evaluation: dict | None
    seq_len: int | None
    output: str | None


def measure(original: str | os.PathLike, compressed: str | os.PathLike,
            batches: tuple[int, ...] = (1, 32), settings=None,
            inputs: np.ndarray | None = None, labels: np.ndarray | None = None,
            timing: TimingConfig | None = None, progress: bool = True,
            engine: str = "onnxruntime", graphs: tuple | None = None,
            references: dict[str, str | os.PathLike] | None = None, seq_len: int = SEQ_LEN,
            output: str = "logits") -> Measurement:
    """Everything about two artifacts (and optional references) on one engine in one
    run: footprint (with peak RSS from child processes), throughput per batch size
    (interleaved, every artifact in every round), fidelity against the original.

    Args:
        original, compressed: the artifacts the ``engine`` runner loads (ONNX files for
            onnxruntime, engine files for TensorRT).
        batches: the batch sizes to time.
        settings: the engine's settings (`OrtSettings`, `TrtSettings`; ``None``: defaults).
        inputs, labels: inputs for fidelity (``None``: none measured): an array of the
            first input, or a list of feeds (input name → array; texts padded per batch);
            and their integer labels for top-1/top-5 (``None``: agreement only).
        timing: the `TimingConfig` (``None``: defaults); progress: show progress bars.
        engine: a registered runner (`RUNNERS`).
        graphs: the ONNX files the artifacts were built from, for parameter counts and
            FLOPs (default: the artifacts themselves, which onnxruntime loads directly).
        references: more artifacts measured the same way beside them, by name (e.g.
            ``{"int8": "original.int8.onnx"}``, the obvious alternative to compression); a
            value may be an ``(artifact, graph)`` pair when the artifact is not ONNX.
        seq_len: a text model's tokens per input for timing, FLOPs and peak memory.
        output: ``"logits"``, or ``"embedding"`` (fidelity by cosine alone, `fidelity`).

    Returns:
        The `Measurement`.

    Raises:
        MixrankError: a missing artifact, or inputs the engine does not take.
    """
    cls = RUNNERS[engine]
    s = settings or cls.settings_type()
    refs = {name: v if isinstance(v, tuple) else (v, v) for name, v in (references or {}).items()}
    for p in (original, compressed, *(a for a, _ in refs.values())):
        if not Path(p).is_file():
            raise MixrankError(f"{'ONNX' if engine == 'onnxruntime' else engine} file {p} does not exist")
    graphs = graphs or (original, compressed)
    arts = [("original", original, graphs[0]), ("compressed", compressed, graphs[1]),
            *((name, a, g) for name, (a, g) in refs.items())]
    res = Measurement.from_dict({"engine": engine, "settings": s.to_dict()})  # the rest: empty, or absent
    runners = {tag: make_runner(engine, p, s) for tag, p, _ in arts}
    try:
        if inputs is not None:  # wrong inputs fail before any work
            check_inputs(runners["original"], inputs)
            n = sum(len(next(iter(f.values()))) for f in inputs) if isinstance(inputs, list) else len(inputs)
            if labels is not None and len(labels) != n:
                raise MixrankError(f"{len(labels)} labels for {n} inputs; give one label per input")
        if any(None in spec.shape[1:] for spec in runners["original"].inputs()):
            res.seq_len = seq_len
        res.output = output
        for tag, p, g in arts:
            res.footprint[tag] = {**onnx_params(g), **peak_rss(p, 1, s, engine, seq_len)}
            res.flops[tag] = {str(b): matmul_flops(g, b, seq_len) for b in batches}
        res.runner = runners["compressed"].describe()
        for b in batches:
            res.throughput.append(throughput(runners, b, timing, progress, seq_len))
        for t in res.throughput:
            t["ideal_speedup"] = res.flops["original"][str(t["batch"])] / res.flops["compressed"][str(t["batch"])]
        if inputs is not None:
            res.fidelity = fidelity(runners["original"], runners["compressed"], inputs, labels, output=output)
            res.reference_fidelity = {name: fidelity(runners["original"], runners[name], inputs, labels,
                                                     output=output) for name in refs}
    finally:
        for r in runners.values():
            r.close()
    if refs:
        res.references = sorted(refs)
    return res
