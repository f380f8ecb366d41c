"""The ``mixrank`` command line: one subcommand per stage, and ``run`` for all of them.

A user mistake raises `MixrankError`, printed as one line, exit 2; anything else is a
bug in mixrank, exit 70 with the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mixrank.compress import MixrankError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 70
# the command line's default budget: 12 % of the model's float32 weight bytes, rank and
# precision chosen per layer (README, "The main job"); the API's default is keep=0.5
DEFAULT_BYTES = "0.12x"


def _log(args):
    return (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def _bytes_arg(text: str) -> int | str:
    """``--bytes``: a byte count, or a fraction of the model's float32 weight bytes (``0.12x``)."""
    t = text.strip().lower()
    if t.endswith("x"):
        return t
    try:
        return int(float(t))
    except ValueError:
        raise MixrankError(f"--bytes must be a byte count or a fraction such as 0.12x, got {text!r}") from None


def compress_config(args: argparse.Namespace):
    """The `CompressConfig` of ``--config FILE`` with every flag given on the command line
    on top. Without a budget from either: ``--bytes 0.12x``. A bytes budget without a
    precision from either chooses it per layer (``auto``)."""
    from mixrank.compress import CompressConfig
    from mixrank.compress._config import merge_settings, read_toml

    flags = {k: v for k, v in (("method", args.method), ("keep", args.keep), ("seed", args.seed),
                               ("bytes", None if args.bytes is None else _bytes_arg(args.bytes)),
                               ("precision", args.precision), ("effort", args.effort), ("device", args.device),
                               ("max_seconds", args.max_seconds), ("max_memory", args.max_memory),
                               ("structure", args.structure))
             if v is not None}
    if args.keep is not None and args.bytes is not None:
        raise MixrankError("give --keep or --bytes, not both")
    raw = read_toml(args.config) if args.config else {}

    def given(key: str, section: str) -> bool:
        return key in raw or key in (raw.get(section) or {})

    defaults = {}
    if not any(given(k, "budget") for k in ("keep", "params", "bytes")) and not ({"keep", "bytes"} & set(flags)):
        defaults["bytes"] = DEFAULT_BYTES
    budget_is_bytes = "bytes" in flags or "bytes" in defaults or (given("bytes", "budget") and "keep" not in flags)
    if budget_is_bytes and not given("precision", "quantize") and "precision" not in flags \
            and not given("dtype", "budget"):
        defaults["precision"] = "auto"
    target = getattr(args, "target", None)
    if target is not None and target.rewrite_target == "tensorrt" and not given("scheme", "quantize"):
        defaults["scheme"] = "symmetric"  # TensorRT's DequantizeLinear takes no zero points
    try:
        return CompressConfig.from_dict(merge_settings(raw, {**defaults, **flags}))
    except MixrankError:
        if args.config:  # name the file when the file alone is wrong
            try:
                CompressConfig.from_dict(merge_settings(raw, defaults))
            except MixrankError as e:
                raise MixrankError(f"{args.config}: {e}") from None
        raise


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise MixrankError(f"--batches must be comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in sizes):
        raise MixrankError(f"--batches must be positive batch sizes, got {text!r}")
    return sizes


def _cmd_run(args: argparse.Namespace) -> dict:
    from ._pipeline import run_pipeline

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise MixrankError("mixrank run is one process; scale the compression out with torchrun ... -m mixrank "
                           "compress, then run the other stages on its factors (mixrank rewrite, build, bench)")
    from ._target import Target

    args.batch_sizes = _batch_sizes(args.batches)
    args.target = Target.from_args(args.engine, args.provider, args.engine_precision, args.threads)
    args.target.check()  # a machine without the engine fails here, before any work
    return run_pipeline(args, compress_config(args), _log(args))


def _output(path, *inputs, overwrite: bool = False):
    """The one output policy: a regular file (or nothing) at ``path``, writable now, and
    none of ``inputs`` unless ``--overwrite``; checked before any work."""
    from mixrank.compress import check_writable_path

    return check_writable_path(path, inputs=inputs, overwrite_input=overwrite)


def _cmd_compress(args: argparse.Namespace) -> dict:
    from mixrank.compress import _dist, compress_model, save_factors

    from ._pipeline import warn
    from ._sources import ModelSource

    cfg = compress_config(args)
    _output(args.output, args.checkpoint, overwrite=args.overwrite)  # before the work, not after it
    ranks = _dist.init_from_env(cfg.device)  # under torchrun: data parallel (docs/design.md, "Scaling out")
    writer = _dist.is_writer()
    src = ModelSource(args.model, args.pretrained, args.checkpoint, not args.quiet, args.max_image_pixels,
                      warn if writer else None)
    calib = src.calibration(args.images, args.calib_images, cfg.seed)
    f = compress_model(src.model, calib.batches, cfg, progress=not args.quiet and writer,
                       source={"model": src.label, "calibration": calib.source, "calibration_images": calib.record})
    out = {"summary": f.summary(), "totals": f.plan.totals, "ranks": _dist.world(),
           "seconds": round(f.timings.get("total_s", 0.0), 2)}
    if writer:
        out["factors"] = str(save_factors(f, args.output))
    if ranks:
        _dist.barrier()  # no rank leaves before the file is written
    return out


def _cmd_export(args: argparse.Namespace) -> dict:
    from mixrank.exporter import export_onnx

    from ._sources import ModelSource

    _opset_ok(args.opset)
    _output(args.output, args.checkpoint, overwrite=args.overwrite)
    src = ModelSource(args.model, args.pretrained, args.checkpoint, not args.quiet)
    rep = export_onnx(src.model, src.example(), args.output, opset=args.opset, fp16=args.fp16,
                      dynamic_batch=not args.static_batch)
    return {"onnx": args.output, "verify": rep["outputs"]}


def _cmd_eval(args: argparse.Namespace) -> dict:
    import torch

    from mixrank.compress import apply_factors, load_factors
    from mixrank.exporter import topk_accuracy

    from ._pipeline import warn
    from ._sources import ModelSource

    src = ModelSource(args.model, args.pretrained, args.checkpoint, not args.quiet, args.max_image_pixels, warn)
    data = src.evaluation(args.images, args.csv)
    if data.labels is None:
        raise MixrankError(f"{args.images} is a flat folder: labels need one sub-folder per class or --csv")
    x, y = data.x, data.labels.numpy()
    results = {}

    def score(name, logits):
        results[name] = {**topk_accuracy(logits, y), "images": int(len(y))}

    with torch.no_grad():
        score("pytorch original", torch.cat([src.model(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy())
        if args.factors:
            small = apply_factors(src.model, load_factors(args.factors)).eval()
            score("pytorch factored", torch.cat([small(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy())
    for path in args.onnx or []:
        from mixrank.engines import make_runner
        from mixrank.engines._runner import run_all
        from mixrank.exporter import load_onnx

        load_onnx(path)  # a missing or corrupt file is named here
        runner = make_runner("onnxruntime", path)
        score(f"onnx {path}", run_all(runner, x.numpy(), 64))
    return {"results": results, "data": data.source, "data_record": data.record}


def _print_eval(r: dict) -> None:
    w = max(len(k) for k in r["results"])
    for k, v in r["results"].items():
        print(f"{k:<{w}}  top-1 {100 * v['top1']:6.2f} %  top-5 {100 * v['top5']:6.2f} %  ({v['images']} images)")


def _cmd_inspect(args: argparse.Namespace) -> dict:
    from mixrank.compress import load_factors

    p = Path(args.file)
    if not p.is_file():
        raise MixrankError(f"{p} does not exist")
    if p.suffix == ".safetensors":
        f = load_factors(p)
        return {"kind": "factors", "summary": f.summary(), "method": f.plan.method,
                "budget": f.plan.budget, "totals": f.plan.totals,
                "layers": {n: {"rank": i.rank, "precision": i.precision, "sparse": i.sparse.structure,
                               "k": i.sparse.k, "nmse": i.nmse, "bytes": i.bytes_after, "form": i.form}
                           for n, i in f.layers.items()}}
    if p.suffix == ".onnx":
        from mixrank.engines import onnx_params
        from mixrank.exporter import check_tensorrt_compat, load_onnx

        m = load_onnx(p)
        ops = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return {"kind": "onnx", **onnx_params(p), "opset": [o.version for o in m.opset_import],
                "inputs": [i.name for i in m.graph.input], "ops": ops,
                "tensorrt_check": check_tensorrt_compat(m)}
    if p.suffix == ".json":
        from mixrank.engines import read_report

        return {"kind": "report", "summary": read_report(p)["summary"]}
    raise MixrankError(f"cannot inspect {p}: expected a factors file (.safetensors), an ONNX file or a "
                       "report (.json)")


def _print_inspect(r: dict) -> None:
    if r["kind"] == "factors":
        print(r["summary"])
        for n, i in r["layers"].items():
            sp = "" if i["sparse"] == "none" else f" + {i['sparse']} k={i['k']}"
            sp = sp or ("" if i.get("form", "lowrank") == "lowrank" else f" pair, {i['form']}")
            print(f"  {n:<32} rank {str(i['rank']):>5} {i['precision']:<5}{sp:<18} NMSE {i['nmse']:.3e}  "
                  f"{i['bytes']:,} bytes")
    elif r["kind"] == "onnx":
        print(f"{r['params']:,} parameters, {r['initializer_bytes']:,} initializer bytes, "
              f"{r['file_bytes']:,} file bytes, opset {r['opset']}")
        print("  ops: " + ", ".join(f"{k}x{v}" for k, v in sorted(r["ops"].items())))
        print("  TensorRT: " + ("ok" if r["tensorrt_check"]["ok"] else str(r["tensorrt_check"]["problems"])))
    else:
        for k, v in r["summary"].items():
            print(f"  {k:<28} {v}")


def _print_simple(r: dict) -> None:
    print(json.dumps(r, indent=2, default=str))


def _opset_ok(opset: int) -> None:
    import torch.onnx._constants as c

    top = getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    if not 17 <= opset <= top:
        raise MixrankError(f"--opset {opset} is not supported: the exporter writes opsets 17 to {top}")


def _cmd_rewrite(args: argparse.Namespace) -> dict:
    from mixrank.exporter import check_tensorrt_compat, rewrite_onnx

    _output(args.output, args.onnx, args.factors, overwrite=args.overwrite)
    rep = rewrite_onnx(args.onnx, args.factors, args.output, allow_partial=args.allow_partial,
                       allow_mismatch=args.allow_mismatch, target=args.target)
    out = rep.to_dict()
    out["tensorrt_check"] = check_tensorrt_compat(args.output)
    return out


def _print_rewrite(r: dict) -> None:
    print(f"rewrote {len(r['rewritten'])} MatMul/Gemm node(s): weight parameters "
          f"{r['params_before']:,} -> {r['params_after']:,}")
    for d in r["dense"]:
        print(f"  left dense: {d['node']} ({d.get('weight', '')}): {d['reason']}")
    if r.get("mismatched"):
        print(f"  WARNING: applied despite a different weight (--allow-mismatch): {', '.join(r['mismatched'])}")
    if r["unmatched_factors"]:
        print(f"  factors matching no node: {', '.join(r['unmatched_factors'])}")
    trt = r["tensorrt_check"]
    print(f"TensorRT {trt['tensorrt']}: " + ("all operators supported" if trt["ok"] else
          "; ".join(p.get("op", p.get("what", "")) + ": " + p["detail"] for p in trt["problems"])))
    print(f"wrote {r['output']}")


def _cmd_build(args: argparse.Namespace) -> dict:
    _output(args.output, args.onnx, overwrite=args.overwrite)
    if args.engine == "tensorrt":
        from mixrank.engines import TrtSettings, build_engine

        st = TrtSettings(precision=args.precision, workspace_mb=args.workspace_mb,
                         max_batch=args.max_batch, opt_batch=min(8, args.max_batch))
        rec = build_engine(args.onnx, args.output, st)
        rec.pop("layers", None)
        return rec
    from mixrank.engines import OrtSettings, build_ort

    return build_ort(args.onnx, args.output, OrtSettings(provider=args.provider, threads=args.threads))


def _print_build(r: dict) -> None:
    print(f"built {r.get('engine', 'tensorrt')} engine {r.get('engine_path', '')} "
          f"({r['engine_bytes']:,} bytes, {r['build_seconds']:.1f} s)")


def _load_array(path: str | None):
    import numpy as np

    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise MixrankError(f"cannot read {path} as a .npy array: {e}") from None


def _cmd_bench(args: argparse.Namespace) -> dict:
    from mixrank.compress import load_factors, output_folder
    from mixrank.engines import (
        OrtSettings,
        TimingConfig,
        build_report,
        check_report,
        load_budget,
        measure,
        write_report,
    )

    batches = _batch_sizes(args.batches)
    limits = load_budget(args.budget) if args.budget else None  # fail early on a bad budget
    plan = load_factors(args.factors).plan if args.factors else None
    inputs, labels = _load_array(args.inputs), _load_array(args.labels)
    if labels is not None and (inputs is None or len(labels) != len(inputs)):
        raise MixrankError(f"--labels has {len(labels)} labels but --inputs has "
                           f"{'no' if inputs is None else len(inputs)} inputs; give one label per input")
    if args.junit:
        _output(args.junit)
    with output_folder(args.out, " ".join(["mixrank", *sys.argv[1:]])) as out:
        res = measure(args.original, args.compressed, batches,
                      OrtSettings(provider=args.provider, threads=args.threads), inputs, labels,
                      TimingConfig(max_seconds=args.seconds), progress=not args.quiet)
        rep = build_report(res, plan)
        paths = write_report(rep, out)
    out = {"report": {k: str(v) for k, v in paths.items()}, "summary": rep["summary"]}
    if limits:
        verdict = check_report(rep, limits)
        out["check"] = verdict
        _write_junit(args.junit, verdict)
    return out


def _write_junit(path, verdict) -> None:
    if path:
        from mixrank.compress import atomic_write_text
        from mixrank.engines import junit_xml

        atomic_write_text(path, junit_xml(verdict))


def _print_bench(r: dict) -> None:
    print(Path(r["report"]["md"]).read_text())
    if "check" in r:
        from mixrank.engines import format_results

        print(format_results(r["check"]))
    print("report: " + ", ".join(r["report"].values()))


def _cmd_check(args: argparse.Namespace) -> dict:
    from mixrank.engines import check_report, load_budget, read_report

    if args.junit:
        _output(args.junit, args.report, args.budget)
    verdict = check_report(read_report(args.report), load_budget(args.budget))
    _write_junit(args.junit, verdict)
    return verdict


def _print_check(r: dict) -> None:
    from mixrank.engines import format_results

    print(format_results(r))
    print({0: "all limits pass", 1: "a limit failed", 3: "something could not be measured"}[
        r["exit_code"]])


def _budget_text(s: dict) -> str:
    b = s.get("budget") or {"keep": s.get("keep")}
    kind = next((k for k in ("keep", "params", "bytes") if b.get(k) is not None), "keep")
    text = f"{kind}={b.get(kind)}"
    if b.get("precision") not in (None, "fp32"):
        text += f", precision {b['precision']}"
        used = b.get("precisions") or {}
        if used:
            text += " (" + ", ".join(f"{n} {p}" for p, n in sorted(used.items())) + ")"
    return text


def _print_summary(s: dict) -> None:
    fp = s["footprint"]
    refs = [r for r in ("int8",) if r in fp]
    cols = ["original", "compressed", *refs]
    fo, fc = fp["original"], fp["compressed"]
    rows = [("parameters", *(f"{fp[k]['params']:,}" for k in cols), f"{s['param_ratio']:.3f}x"),
            ("file MB", *(f"{fp[k]['file_bytes'] / 1e6:.2f}" for k in cols),
             f"{s['file_bytes_ratio']:.3f}x" + (f" ({s['bytes_ratio_vs_int8']:.2f}x of int8)" if refs else "")),
            ("peak RSS MB (ORT, b1)", *(f"{fp[k]['peak_rss_bytes'] / 1e6:.1f}" for k in cols),
             f"{(fc['peak_rss_bytes'] - fo['peak_rss_bytes']) / 1e6:+.1f} MB")]
    for t in s["throughput"]:
        rows.append((f"latency p50 ms, batch {t['batch']}", *(f"{t['p50_ms'][k]:.2f}" for k in cols),
                     f"{t['speedup']:.2f}x (FLOP ideal {t['ideal_speedup']:.2f}x)"))
    if "top1_original" in s:
        rows.append(("top-1 accuracy %", f"{100 * s['top1_original']:.2f}", f"{100 * s['top1_compressed']:.2f}",
                     *(f"{100 * s[f'{r}_top1']:.2f}" for r in refs), f"{-100 * s['top1_drop']:+.2f} pt"))
    if "top1_agreement" in s:
        rows.append(("top-1 agreement %", "", f"{100 * s['top1_agreement']:.2f}",
                     *(f"{100 * s[f'{r}_top1_agreement']:.2f}" for r in refs), ""))
    head = ("", *cols, "change")
    w = [max(len(r[i]) for r in [*rows, head]) for i in range(len(head))]
    print(f"{s['model']}: {s['method']}, {_budget_text(s)}")
    for r in [head, *rows]:
        print("  ".join([f"{r[0]:<{w[0]}}", *(f"{v:>{w[i]}}" for i, v in enumerate(r[1:-1], 1)),
                         f"{r[-1]:<{w[-1]}}"]))
    if refs:
        print("int8 = the original quantized by onnxruntime's weight-only quantizer (MatMulNBits, block 32)")
    ev = s.get("evaluation") or {}
    if ev and not ev.get("held_out", True):
        print(f"note: accuracy and agreement were measured on the {ev['samples']} calibration images "
              f"({ev['source']}), not on held-out data; pass --eval-images or --eval-csv")
    if "check" in s:
        from mixrank.engines import format_results

        print(format_results(s["check"]))
    print(f"artifacts in {s['out']}/ (manifest: {s['manifest']})")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error (exit 2)."""

    def error(self, message: str):
        print(f"mixrank: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except where the default is ``None`` ("not given")."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = _Parser(prog="mixrank", formatter_class=fmt,
                                description="Activation-aware mixed-rank compression of Vision Transformers.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    _add = sub.add_parser

    def add_parser(*a, **k):  # every subcommand takes -v and the same help format
        sp = _add(*a, formatter_class=fmt, **k)
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="more output; tracebacks for errors too")
        return sp

    sub.add_parser = add_parser

    def model_args(sp, compress: bool = True):
        sp.add_argument("--model", default=None,
                        help="timm model name; default: the built-in ViT trained on sklearn digits")
        sp.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
        sp.add_argument("--checkpoint", help="weights: .safetensors, or .pth (weights_only)")
        sp.add_argument("--images", help="calibration image folder (flat or one sub-folder per class)")
        sp.add_argument("--calib-images", type=int, default=512, help="calibration images used")
        sp.add_argument("--max-image-pixels", type=int, default=None,
                        help="refuse images that decode to more pixels (default: 40 million)")
        if compress:
            sp.add_argument("--config", help="TOML configuration (docs/design.md, 'Configuration'); "
                                             "flags given here override its values")
            sp.add_argument("--keep", type=float, default=None,
                            help="fraction of the block Linear parameters kept (fp32 factors unless --precision)")
            sp.add_argument("--bytes", default=None,
                            help=f"storage budget: a byte count for the block Linear layers, or a fraction "
                                 f"of the whole model's float32 weight bytes such as 0.12x (default: "
                                 f"{DEFAULT_BYTES}; rank and precision are then chosen per layer)")
            sp.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "int8", "int4"],
                            help="storage of the compressed layers (default: auto with a bytes budget, "
                                 "fp32 with --keep)")
            sp.add_argument("--method", default=None, help="compression method (default: mixrank; also "
                                                           "whiten, svd, asvd, oats)")
            sp.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
            sp.add_argument("--structure", default=None, choices=["auto", "lowrank", "pairs"],
                            help="pairs: attention query/key, value/output and MLP pairs shrink their "
                                 "shared dimension (docs/design.md, 'Pairwise structures'); lowrank: every "
                                 "layer factored alone; auto (default for mixrank): both scored, the better "
                                 "kept")
            sp.add_argument("--effort", default=None, choices=["fast", "balanced", "best"],
                            help="fast: the closed form and a cheap allocation; balanced (default); best: "
                                 "every refinement at full length")
            sp.add_argument("--device", default=None,
                            help="where the compression runs: cpu (default) or cuda[:N]; under torchrun each "
                                 "rank takes cuda:LOCAL_RANK and nccl")
            sp.add_argument("--max-seconds", type=float, default=None,
                            help="a wall-clock cap on the compression (default: none, so that the same "
                                 "inputs give the same factors on any machine); the plan records it")
            sp.add_argument("--max-memory", default=None, metavar="SIZE",
                            help="memory the calibration Gram matrices may hold, e.g. 4GB; the largest beyond "
                                 "it are accumulated in memory-mapped files in MIXRANK_SPILL_DIR (default: "
                                 "no limit)")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    run = sub.add_parser(
        "run", help="the main job: compress, export, rewrite, build, measure, report, check",
        description="All stages in one output folder. With no arguments: the built-in ViT "
                    "trained on scikit-learn's digits (trained once, cached). Finished stages "
                    "are reused when their inputs are unchanged; --force redoes them.",
    )
    model_args(run)
    run.add_argument("--eval-images", help="labelled image folder for accuracy (default: --images)")
    run.add_argument("--eval-csv", help="CSV of file,label rows for accuracy")
    run.add_argument("--out", default="mixrank-out", help="output folder")
    run.add_argument("--batches", default="1,32", help="batch sizes to time")
    run.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    run.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default=None,
                     help="engine to build, time and gate (default: onnxruntime)")
    run.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                     help="onnxruntime execution provider (default: cpu; cuda and tensorrt need mixrank[gpu])")
    run.add_argument("--engine-precision", choices=["fp32", "fp16", "int8"], default=None,
                     help="TensorRT's precision (default: fp16), with --engine tensorrt or --provider tensorrt; "
                          "the factors' own storage is --precision")
    run.add_argument("--seconds", type=float, default=20.0, help="timing limit per batch size")
    run.add_argument("--budget", help="TOML budget file: fail (exit 1) when a limit is missed")
    run.add_argument("--junit", help="write the budget check as JUnit XML here")
    run.add_argument("--force", action="store_true", help="redo every stage")
    run.set_defaults(func=_cmd_run, show=_print_summary)

    cp = sub.add_parser("compress", help="compress a model into a factors file")
    model_args(cp)
    cp.add_argument("-o", "--output", default="model.mixrank.safetensors", help="factors file")
    cp.add_argument("--overwrite", action="store_true", help="allow the output to be an input file")
    cp.set_defaults(func=_cmd_compress, show=_print_simple)

    ex = sub.add_parser("export", help="export the original model to ONNX (checked against PyTorch)")
    model_args(ex, compress=False)
    ex.add_argument("-o", "--output", default="original.onnx", help="ONNX file")
    ex.add_argument("--overwrite", action="store_true", help="allow the output to be an input file")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    ex.add_argument("--fp16", action="store_true", help="float16 model (TensorRT 11)")
    ex.add_argument("--static-batch", action="store_true", help="fixed batch dimension")
    ex.set_defaults(func=_cmd_export, show=_print_simple)

    ev = sub.add_parser("eval", help="top-1/top-5 of the original, factored and ONNX models")
    model_args(ev, compress=False)
    ev.add_argument("--csv", help="CSV of file,label rows")
    ev.add_argument("--factors", help="factors file: also evaluate the factored PyTorch model")
    ev.add_argument("--onnx", nargs="*", help="ONNX files to evaluate too")
    ev.set_defaults(func=_cmd_eval, show=_print_eval)

    ins = sub.add_parser("inspect", help="summarise a factors file, an ONNX file or a report")
    ins.add_argument("file", help="model.mixrank.safetensors, *.onnx or report.json")
    ins.add_argument("--json", action="store_true", help="print as JSON")
    ins.add_argument("-q", "--quiet", action="store_true")
    ins.set_defaults(func=_cmd_inspect, show=_print_inspect)

    rw = sub.add_parser(
        "rewrite", help="rewrite an ONNX model's MatMuls with a factors file (no PyTorch model needed)",
        description="Replace every constant-weight MatMul/Gemm that has factors by its "
                    "low-rank-plus-sparse subgraph; matches by initializer name, else by weight "
                    "fingerprint, so ONNX files from other exporters work too.",
    )
    rw.add_argument("onnx", help="input ONNX model")
    rw.add_argument("factors", help="factors file (model.mixrank.safetensors)")
    rw.add_argument("-o", "--output", required=True, help="rewritten ONNX model to write")
    rw.add_argument("--allow-partial", action="store_true",
                    help="rewrite what matches even if some factors match no node")
    rw.add_argument("--allow-mismatch", action="store_true",
                    help="apply factors to a layer matched by name even if its weight is not the one they "
                         "were computed from (recorded in the report)")
    rw.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                    help="engine the integer weights are written for")
    rw.add_argument("--overwrite", action="store_true", help="allow the output to be an input file")
    rw.add_argument("--json", action="store_true", help="print the rewrite report as JSON")
    rw.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    rw.set_defaults(func=_cmd_rewrite, show=_print_rewrite)

    bd = sub.add_parser("build", help="build an engine from an ONNX file",
                        description="onnxruntime: save the graph onnxruntime optimises for these "
                                    "settings; tensorrt: build and serialize a TensorRT engine "
                                    "(needs the tensorrt package and an NVIDIA GPU).")
    bd.add_argument("onnx", help="ONNX model")
    bd.add_argument("-o", "--output", required=True, help="engine file to write")
    bd.add_argument("--overwrite", action="store_true", help="allow the output to be an input file")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        summary = args.func(args)
    except MixrankError as e:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
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
    if os.environ.get("RANK", "0") not in ("", "0"):
        pass  # under torchrun rank 0 speaks for all
    elif args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        args.show(summary)
    if args.command == "check":
        return summary["exit_code"]
    return summary.get("check", {}).get("exit_code", 0) if isinstance(summary, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
