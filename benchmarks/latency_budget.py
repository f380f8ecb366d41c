"""A latency budget against byte budgets (issue 26's last target), on onnxruntime's CPU.

For one model: the latency table of its selected layers is measured at batch 32
(`mixrank.engines.latency_table`); one plan is compressed under ``--latency`` (and the
byte budget ``--bytes``), and a sweep of plans under byte budgets alone (``--sweep``).
Every plan is rewritten with its integer weights expanded (the form the table times),
and all of them and the original are timed interleaved in one run, at batch 1 and 32.

Columns: file bytes (x the original's), the predicted batch-32 time as a fraction of the
original's (`LatencyBudget.predict_plan`, the table's conditions) and the measured one
(this run's interleaved p50s), the prediction's error, and fidelity on held-out inputs
(digits: top-1 accuracy on the test split and the logits' KL to the original; ViTs with
random weights: the output cosine, which only says how far the numbers move; MiniLM: the
embedding cosine on held-out docstrings).

Verdicts printed: the latency plan's measured batch-32 time within 10 % of its prediction;
and its fidelity against the best byte-budget plan whose measured batch-32 time is no
greater than the latency plan's (or, where none is, the fastest of them).

    python benchmarks/latency_budget.py [--model digits|deit_small_patch16_224|minilm]
        [--latency 0.5x] [--bytes 0.12x] [--sweep 0.04x,0.06x,0.08x,0.10x,0.12x]
        [--method mixrank] [--effort fast] [--calib 64] [--seconds 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engines_speed import cosine, minilm_case, outputs, vit_case  # noqa: E402

BATCHES = (1, 32)


def digits_case(tmp: Path, calib_count: int):
    from mixrank._sources import ModelSource

    src = ModelSource(None, progress=False)
    calib = src.calibration(None, calib_count, 0)
    ev = src.evaluation()
    feeds = [{"input": b.numpy()} for b in ev.batches]
    return src.model, calib.batches, feeds, {}, f"trained on digits; {ev.count} test digits", ev.labels.numpy()


def fidelity(ref: np.ndarray, out: np.ndarray, labels) -> dict:
    f = {"cosine": cosine(ref, out)}
    if labels is not None:
        lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
        lq = torch.log_softmax(torch.from_numpy(out).double(), -1)
        f["kl"] = float((lp.exp() * (lp - lq)).sum(-1).mean())
        f["top1"] = float((out.argmax(-1) == labels).mean())
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--latency", default="0.5x")
    ap.add_argument("--bytes", default="0.12x", help="the latency plan's byte budget")
    ap.add_argument("--sweep", default="0.04x,0.06x,0.08x,0.10x,0.12x", help="the byte-budget plans")
    ap.add_argument("--method", default="mixrank")
    ap.add_argument("--effort", default="fast")
    ap.add_argument("--calib", type=int, default=64, help="calibration images (digits) or texts")
    ap.add_argument("--seconds", type=float, default=30.0, help="timing limit per batch size")
    ap.add_argument("--out", default=None, help="keep the artifacts here")
    args = ap.parse_args()

    from mixrank.compress import CompressConfig, LatencyBudget, LatencyTable, compress_model, latency_layers
    from mixrank.engines import OrtSettings, TimingConfig, latency_table, make_runner, throughput
    from mixrank.exporter import export_onnx, onnx_file_bytes, rewrite_onnx

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(args.out or tmp_)
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        labels = None
        if args.model == "digits":
            model, calib, feeds, extra, desc, labels = digits_case(tmp, args.calib)
            example, tokens = calib[0][:1], None
        elif args.model == "minilm":
            model, calib, feeds, extra, desc = minilm_case(tmp)
            example, tokens = {k: v[:2] for k, v in calib[0].items()}, 64
        else:
            model, calib, feeds, extra, desc = vit_case(args.model, tmp)
            example, tokens = calib[0][:1], None
        seq = 64
        export_onnx(model, example, tmp / "original.onnx")
        base = CompressConfig(args.method, effort=args.effort, **extra)
        settings = OrtSettings()
        sample = example if tokens is None else None
        layers = latency_layers(model, base, sample, tokens)
        table = LatencyTable.from_dict(latency_table(tmp / "original.onnx", layers, 32, settings, seq_len=seq,
                                                     progress=False))
        budget = LatencyBudget.of(table, args.latency)
        print(f"table: original {table.original_ms:.2f} ms at batch 32, {budget.rest_ms:.2f} ms outside the "
              f"selected layers; budget {budget.limit_ms:.2f} ms", flush=True)

        plans = {}

        def plan(label: str, bytes_: str, latency=None):
            cfg = CompressConfig(args.method, effort=args.effort, bytes=bytes_, **extra)
            t = time.perf_counter()
            f = compress_model(model, calib, cfg, progress=False, latency=latency)
            path = tmp / f"{label.replace(' ', '_')}.onnx"
            rewrite_onnx(tmp / "original.onnx", f, path, weights="expanded")
            plans[label] = (path, f.plan)
            print(f"{label}: compressed in {time.perf_counter() - t:.0f} s, predicted "
                  f"{budget.predict_plan(f.plan) / table.original_ms:.3f}x", flush=True)

        plan(f"latency {args.latency}, bytes {args.bytes}", args.bytes, budget)
        for b in args.sweep.split(","):
            plan(f"bytes {b}", b)
        built = time.perf_counter() - t0

        ref = outputs(tmp / "original.onnx", feeds)
        fid = {k: fidelity(ref, outputs(p, feeds), labels) for k, (p, _) in plans.items()}
        paths = {"original": tmp / "original.onnx", **{k: p for k, (p, _) in plans.items()}}
        runners = {k: make_runner("onnxruntime", p, settings) for k, p in paths.items()}
        cfg = TimingConfig(warmup=2, min_rounds=5, max_rounds=40, iters_per_round=2, max_seconds=args.seconds)
        p50: dict[str, dict[int, float]] = {k: {} for k in paths}
        try:
            for b in BATCHES:
                t = throughput(runners, b, cfg, progress=False, seq_len=seq)
                for k, s in t["sessions"].items():
                    p50[k][b] = s["p50_ms"]
        finally:
            for r in runners.values():
                r.close()
        o = p50["original"]
        base_bytes = onnx_file_bytes(paths["original"])
        top1 = "" if labels is None else f", original top-1 {100 * float((ref.argmax(-1) == labels).mean()):.2f} %"
        lines = [f"\n### {args.model} ({desc}{top1}; method {args.method}, effort {args.effort}; "
                 f"{torch.get_num_threads()} threads; built in {built:.0f} s; timed interleaved, at most "
                 f"{args.seconds:.0f} s per batch size)", "",
                 f"Latency table at batch 32: the original {table.original_ms:.2f} ms alone, "
                 f"{budget.rest_ms:.2f} ms of it outside the selected layers; budget {args.latency} = "
                 f"{budget.limit_ms:.2f} ms. Here the original ran {o[32]:.2f} ms (b32), {o[1]:.2f} ms (b1).", "",
                 "| plan | file bytes | b32 predicted | b32 measured | error | b1 measured | cosine | "
                 + ("KL | top-1 |" if labels is not None else ""),
                 "|---|---|---|---|---|---|---|" + ("---|---|" if labels is not None else "")]
        rows = {}
        for k, (p, pl) in plans.items():
            pred = budget.predict_plan(pl) / table.original_ms
            meas = p50[k][32] / o[32]
            rows[k] = (pred, meas)
            f = fid[k]
            lines.append(f"| {k} | {onnx_file_bytes(p) / base_bytes:.3f}x | {pred:.3f}x | {meas:.3f}x | "
                         f"{100 * (meas / pred - 1):+.1f} % | {p50[k][1] / o[1]:.3f}x | {f['cosine']:.5f} | "
                         + (f"{f['kl']:.2e} | {100 * f['top1']:.2f} % |" if labels is not None else ""))
        lat = next(iter(plans))
        pred, meas = rows[lat]
        err = meas / pred - 1
        lines += ["", f"{args.model}: the latency plan measured {meas:.3f}x against a predicted {pred:.3f}x: "
                  f"{100 * err:+.1f} % ({'within' if abs(err) <= 0.10 else 'NOT within'} 10 %); budget "
                  f"{'met' if meas <= budget.limit_ms / table.original_ms else 'NOT met'} as measured here"]
        key = "kl" if labels is not None else "cosine"
        better = (lambda a, b: a <= b) if key == "kl" else (lambda a, b: a >= b)
        peers = [k for k in rows if k != lat and rows[k][1] <= meas]
        if not peers:
            peers = [min((k for k in rows if k != lat), key=lambda k: rows[k][1])]
            note = "no byte plan is as fast; the fastest"
        else:
            note = "the best byte plan at most as slow"
        best = min(peers, key=lambda k: fid[k][key]) if key == "kl" else max(peers, key=lambda k: fid[k][key])
        lines.append(f"{args.model}: {note}: {best} ({rows[best][1]:.3f}x, {key} {fid[best][key]:.5g}); the "
                     f"latency plan's {key} {fid[lat][key]:.5g}: "
                     f"{'no worse' if better(fid[lat][key], fid[best][key]) else 'WORSE'}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
