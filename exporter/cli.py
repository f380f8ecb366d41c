"""The ``mixrank`` command line.

For now one stage exists end to end (compress); ``mixrank run`` with no argument
runs it on the built-in default, the ViT trained on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 70


def _cmd_run(args: argparse.Namespace) -> dict:
    import torch

    from compress import CompressConfig, apply_factors, compress_model, save_factors
    from compress._demo import accuracy, digits_data, digits_vit

    torch.manual_seed(args.seed)
    progress = not args.quiet
    out = Path(args.out)
    model = digits_vit(progress=progress)
    xtr, _, xte, yte = digits_data()
    calib = [xtr[i:i + 64] for i in range(0, min(args.calib_images, len(xtr)), 64)]
    config = CompressConfig(method=args.method, keep=args.keep, seed=args.seed)
    t0 = time.perf_counter()
    factors = compress_model(model, calib, config, progress=progress,
                             source={"model": "digits_vit (built-in)",
                                     "calibration": "sklearn digits, train split"})
    seconds = time.perf_counter() - t0
    path = save_factors(factors, out / "model.mixrank.safetensors")
    small = apply_factors(model, factors)
    t = factors.plan["totals"]
    summary = {
        "model": "digits_vit (built-in)",
        "method": args.method,
        "keep": args.keep,
        "factors_file": str(path),
        "params_before": t["model_params_before"],
        "params_after": t["model_params_after"],
        "block_params_before": t["params_before"],
        "block_params_after": t["params_after"],
        "accuracy_before": accuracy(model, xte, yte),
        "accuracy_after": accuracy(small, xte, yte),
        "heldout_images": len(yte),
        "compress_seconds": round(seconds, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _cmd_rewrite(args: argparse.Namespace) -> dict:
    from ._rewrite import rewrite_onnx
    from ._trt_check import check_tensorrt_compat

    rep = rewrite_onnx(args.onnx, args.factors, args.output, allow_partial=args.allow_partial)
    out = rep.to_dict()
    out["tensorrt_check"] = check_tensorrt_compat(args.output)
    return out


def _print_rewrite(r: dict) -> None:
    print(f"rewrote {len(r['rewritten'])} MatMul/Gemm node(s): weight parameters "
          f"{r['params_before']:,} -> {r['params_after']:,}")
    for d in r["dense"]:
        print(f"  left dense: {d['node']} ({d.get('weight', '')}): {d['reason']}")
    if r["unmatched_factors"]:
        print(f"  factors matching no node: {', '.join(r['unmatched_factors'])}")
    trt = r["tensorrt_check"]
    print(f"TensorRT {trt['tensorrt']}: " + ("all operators supported" if trt["ok"] else
          "; ".join(p.get("op", p.get("what", "")) + ": " + p["detail"] for p in trt["problems"])))
    print(f"wrote {r['output']}")


def _cmd_build(args: argparse.Namespace) -> dict:
    if args.engine == "tensorrt":
        from engines._tensorrt import TrtSettings, build_engine

        st = TrtSettings(precision=args.precision, workspace_mb=args.workspace_mb,
                         max_batch=args.max_batch, opt_batch=min(8, args.max_batch))
        rec = build_engine(args.onnx, args.output, st)
        rec.pop("layers", None)
        return rec
    from engines import OrtSettings
    from engines._ort import build_ort

    return build_ort(args.onnx, args.output, OrtSettings(provider=args.provider,
                                                        threads=args.threads))


def _print_build(r: dict) -> None:
    print(f"built {r.get('engine', 'tensorrt')} engine {r.get('engine_path', '')} "
          f"({r['engine_bytes']:,} bytes, {r['build_seconds']:.1f} s)")


def _load_array(path: str | None):
    import numpy as np

    from compress import MixrankError

    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise MixrankError(f"cannot read {path} as a .npy array: {e}") from None


def _cmd_bench(args: argparse.Namespace) -> dict:
    from compress import MixrankError, load_factors
    from engines import (
        OrtSettings,
        TimingConfig,
        build_report,
        check_report,
        load_budget,
        measure,
        write_report,
    )

    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise MixrankError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    limits = load_budget(args.budget) if args.budget else None  # fail early on a bad budget
    plan = load_factors(args.factors).plan if args.factors else None
    res = measure(args.original, args.compressed, batches,
                  OrtSettings(provider=args.provider, threads=args.threads),
                  _load_array(args.inputs), _load_array(args.labels),
                  TimingConfig(max_seconds=args.seconds), progress=not args.quiet)
    rep = build_report(res, plan)
    paths = write_report(rep, args.out)
    out = {"report": {k: str(v) for k, v in paths.items()}, "summary": rep["summary"]}
    if limits:
        verdict = check_report(rep, limits)
        out["check"] = verdict
        _write_junit(args.junit, verdict)
    return out


def _write_junit(path, verdict) -> None:
    if path:
        from engines import junit_xml

        Path(path).write_text(junit_xml(verdict))


def _print_bench(r: dict) -> None:
    print(Path(r["report"]["md"]).read_text())
    if "check" in r:
        from engines import format_results

        print(format_results(r["check"]))
    print("report: " + ", ".join(r["report"].values()))


def _cmd_check(args: argparse.Namespace) -> dict:
    from compress import MixrankError
    from engines import check_report, load_budget

    p = Path(args.report)
    if not p.is_file():
        raise MixrankError(f"report {p} does not exist (run mixrank bench first)")
    try:
        rep = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MixrankError(f"{p} is not a JSON report: {e}") from None
    verdict = check_report(rep, load_budget(args.budget))
    _write_junit(args.junit, verdict)
    return verdict


def _print_check(r: dict) -> None:
    from engines import format_results

    print(format_results(r))
    print({0: "all limits pass", 1: "a limit failed", 3: "something could not be measured"}[
        r["exit_code"]])


def _print_summary(s: dict) -> None:
    rows = [
        ("parameters (model)", f"{s['params_before']:,}", f"{s['params_after']:,}",
         f"{s['params_after'] / s['params_before']:.3f}x"),
        ("parameters (blocks)", f"{s['block_params_before']:,}", f"{s['block_params_after']:,}",
         f"{s['block_params_after'] / s['block_params_before']:.3f}x"),
        (f"top-1 ({s['heldout_images']} held-out digits)", f"{100 * s['accuracy_before']:.2f} %",
         f"{100 * s['accuracy_after']:.2f} %",
         f"{100 * (s['accuracy_after'] - s['accuracy_before']):+.2f} pt"),
    ]
    w = [max(len(r[i]) for r in rows + [("", "original", "compressed", "change")])
         for i in range(4)]
    print(f"{'':<{w[0]}}  {'original':>{w[1]}}  {'compressed':>{w[2]}}  {'change':>{w[3]}}")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}")
    print(f"factors: {s['factors_file']}  ({s['method']}, keep={s['keep']}, "
          f"{s['compress_seconds']} s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixrank",
        description="Activation-aware mixed-rank compression of Vision Transformers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser(
        "run", help="the main job on the built-in default (digits ViT)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train (once, cached) the small ViT on scikit-learn's digits, compress it, "
                    "write the factors file and print what was gained and lost.",
    )
    run.add_argument("--keep", type=float, default=0.4,
                     help="fraction of the block Linear parameters kept")
    run.add_argument("--method", default="mixrank", choices=["mixrank", "whiten", "svd"],
                     help="compression method")
    run.add_argument("--calib-images", type=int, default=512, help="calibration images")
    run.add_argument("--out", default="mixrank-out", help="output folder")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run, show=_print_summary)

    rw = sub.add_parser(
        "rewrite", help="rewrite an ONNX model's MatMuls with a factors file (no PyTorch model needed)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Replace every constant-weight MatMul/Gemm that has factors by its "
                    "low-rank-plus-sparse subgraph; matches by initializer name, else by weight "
                    "fingerprint, so ONNX files from other exporters work too.",
    )
    rw.add_argument("onnx", help="input ONNX model")
    rw.add_argument("factors", help="factors file (model.mixrank.safetensors)")
    rw.add_argument("-o", "--output", required=True, help="rewritten ONNX model to write")
    rw.add_argument("--allow-partial", action="store_true",
                    help="rewrite what matches even if some factors match no node")
    rw.add_argument("--json", action="store_true", help="print the rewrite report as JSON")
    rw.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    rw.set_defaults(func=_cmd_rewrite, show=_print_rewrite)

    fmt = argparse.ArgumentDefaultsHelpFormatter
    bd = sub.add_parser("build", help="build an engine from an ONNX file", formatter_class=fmt,
                        description="onnxruntime: save the graph onnxruntime optimises for these "
                                    "settings; tensorrt: build and serialize a TensorRT engine "
                                    "(needs the tensorrt package and an NVIDIA GPU).")
    bd.add_argument("onnx", help="ONNX model")
    bd.add_argument("-o", "--output", required=True, help="engine file to write")
    bd.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    bd.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                    help="onnxruntime execution provider")
    bd.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
    bd.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16",
                    help="TensorRT 10 precision flag (TensorRT 11 takes it from the ONNX file)")
    bd.add_argument("--workspace-mb", type=int, default=2048, help="TensorRT workspace limit")
    bd.add_argument("--max-batch", type=int, default=32, help="TensorRT profile max batch")
    bd.add_argument("--json", action="store_true", help="print the build record as JSON")
    bd.add_argument("-q", "--quiet", action="store_true")
    bd.set_defaults(func=_cmd_build, show=_print_build)

    be = sub.add_parser("bench", help="measure original vs compressed side by side, write the report",
                        formatter_class=fmt,
                        description="Footprint (parameters, bytes, peak RSS in child processes), "
                                    "throughput per batch size (interleaved rounds) and fidelity "
                                    "of two ONNX models on onnxruntime; writes report.json, "
                                    "report.md and plots; checks a budget file if given.")
    be.add_argument("original", help="original ONNX model")
    be.add_argument("compressed", help="compressed ONNX model")
    be.add_argument("--factors", help="factors file (adds the per-layer table and plot)")
    be.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    be.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    be.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
    be.add_argument("--inputs", help=".npy array of preprocessed inputs for fidelity")
    be.add_argument("--labels", help=".npy array of integer labels (top-1/top-5 accuracy)")
    be.add_argument("--seconds", type=float, default=30.0, help="time limit per batch size")
    be.add_argument("--out", default="mixrank-out", help="report folder")
    be.add_argument("--budget", help="TOML budget file to check the report against")
    be.add_argument("--junit", help="write the check as JUnit XML here")
    be.add_argument("--json", action="store_true", help="print the summary as JSON")
    be.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    be.set_defaults(func=_cmd_bench, show=_print_bench)

    ck = sub.add_parser("check", help="check a report against a budget file (the CI gate)",
                        formatter_class=fmt,
                        description="Exit 0 when every limit passes, 1 when a limit fails, 3 when "
                                    "a limit could not be measured, 2 on a usage error.")
    ck.add_argument("report", help="report.json from mixrank bench / run")
    ck.add_argument("budget", help="TOML budget file")
    ck.add_argument("--junit", help="write the results as JUnit XML here")
    ck.add_argument("--json", action="store_true", help="print the results as JSON")
    ck.add_argument("-q", "--quiet", action="store_true")
    ck.set_defaults(func=_cmd_check, show=_print_check)
    return p


def main(argv: list[str] | None = None) -> int:
    from compress import MixrankError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        summary = args.func(args)
    except MixrankError as e:
        print(f"mixrank: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mixrank: interrupted", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print("mixrank: internal error: this is a bug in mixrank, not in your input; please "
              "report it with the traceback above and the command you ran", file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        args.show(summary)
    code = summary.get("exit_code") if args.command == "check" else \
        summary.get("check", {}).get("exit_code", 0) if args.command == "bench" else 0
    return code


if __name__ == "__main__":
    sys.exit(main())
