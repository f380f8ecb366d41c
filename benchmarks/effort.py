"""Time and error of each effort preset (``--effort fast|balanced|best``) against the
closed form (``whiten``), on the quality benchmark's models and data (benchmarks/quality.py).

For every model and keep: whiten, fast and balanced; ``best`` at keep 0.4 only (it is the
slow one). KL is measured on held-out data (the digits test split / held-out crops), never
on the calibration batches. Prints issue 13's targets:

- vit_small: balanced <= 120 s with KL <= 0.5x whiten's at keep 0.4, 0.3, 0.2;
- every model: fast <= 1.5x whiten's time with KL <= whiten's;

and writes ``effort.md`` (the README's table) and ``effort_rows.jsonl``.

    python benchmarks/effort.py [--models digits,wide,deit_tiny,vit_small] [--keeps 0.4,0.3,0.2]
        [--best-keeps 0.4] [--out benchmarks/results]

Times are wall-clock seconds of `compress_model` on this machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from quality import evaluate, load_case


def run(model, calib, xte, yte, keep: float, name: str) -> dict:
    from mixrank.compress import CompressConfig, apply_factors, compress_model

    cfg = CompressConfig(method="whiten", keep=keep) if name == "whiten" else CompressConfig(keep=keep, effort=name)
    t0 = time.perf_counter()
    f = compress_model(model, calib, cfg, progress=False)
    secs = time.perf_counter() - t0
    r = evaluate(model, apply_factors(model, f), xte, yte)
    return {"keep": keep, "preset": name, "seconds": round(secs, 1), "kl": r["kl"], "agree": r["agree"],
            "variant": f.plan.allocation.refinement.chosen, "evaluations": f.plan.allocation.evaluations,
            "timings": {k: round(v, 1) for k, v in f.timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,wide,deit_tiny,vit_small")
    ap.add_argument("--keeps", default="0.4,0.3,0.2")
    ap.add_argument("--best-keeps", default="0.4")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keeps = [float(k) for k in args.keeps.split(",")]
    best_keeps = [float(k) for k in args.best_keeps.split(",") if k]
    header = (f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    rows, verdicts = [], []
    for case in args.models.split(","):
        model, calib, xte, yte = load_case(case)
        for keep in keeps:
            for name in ("whiten", "fast", "balanced") + (("best",) if keep in best_keeps else ()):
                r = {"model": case, **run(model, calib, xte, yte, keep, name)}
                rows.append(r)
                print(json.dumps(r), flush=True)
        verdicts += targets(case, [r for r in rows if r["model"] == case])
    with open(out / "effort_rows.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "machine": header}) + "\n")
    write_table(out / "effort.md", rows, header, verdicts)
    print("\n".join(verdicts))


def targets(case: str, rows: list[dict]) -> list[str]:
    by = {(r["keep"], r["preset"]): r for r in rows}
    out = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        w, f, b = by.get((keep, "whiten")), by.get((keep, "fast")), by.get((keep, "balanced"))
        if w and f:
            ok = f["seconds"] <= 1.5 * w["seconds"] and f["kl"] <= w["kl"]
            out.append(f"{case} keep={keep}: fast {f['seconds']:.1f} s ({f['seconds'] / w['seconds']:.2f}x whiten's "
                       f"{w['seconds']:.1f} s), KL {f['kl']:.3e} ({f['kl'] / w['kl']:.2f}x whiten's) "
                       f"{'PASS' if ok else 'FAIL'} (target <= 1.5x time, <= 1x KL)")
        if w and b:
            ratio = b["kl"] / w["kl"]
            line = (f"{case} keep={keep}: balanced {b['seconds']:.1f} s, KL {b['kl']:.3e} = {ratio:.2f}x whiten's")
            if case == "vit_small":
                ok = b["seconds"] <= 120 and ratio <= 0.5
                line += f" {'PASS' if ok else 'FAIL'} (target <= 120 s, <= 0.5x KL)"
            out.append(line)
    return out


def write_table(path: Path, rows: list[dict], header: str, verdicts: list[str]) -> None:
    lines = ["# Effort presets: compression time and held-out KL", "", f"Measured on {header}; "
             "`python benchmarks/effort.py`. KL: logits KL to the original on held-out data.", "",
             "| model | keep | preset | time (s) | KL | KL / whiten | top-1 agreement | chosen variant |",
             "|---|---|---|---|---|---|---|---|"]
    whiten = {(r["model"], r["keep"]): r["kl"] for r in rows if r["preset"] == "whiten"}
    for r in rows:
        w = whiten.get((r["model"], r["keep"]))
        lines.append(f"| {r['model']} | {r['keep']} | {r['preset']} | {r['seconds']:.1f} | {r['kl']:.3e} | "
                     f"{r['kl'] / w:.2f} | {100 * r['agree']:.1f} % | {r['variant']} |" if w else "")
    lines += ["", "```", *verdicts, "```", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
