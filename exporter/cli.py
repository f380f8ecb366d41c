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
    return 0


if __name__ == "__main__":
    sys.exit(main())
