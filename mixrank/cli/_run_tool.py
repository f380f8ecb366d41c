"""``mixrank run``: the main job, every stage in one output folder."""

from __future__ import annotations

from mixrank.core import MixrankError

from ._args import (
    INT_WEIGHT_CHOICES,
    CompressArgs,
    LimitsArgs,
    ModelArgs,
    Printing,
    Tool,
    batch_sizes,
    int_weights_help,
    log,
)


class Run(Tool):
    name = "run"
    help = "the main job: compress, export, rewrite, build, measure, report, check"
    description = ("All stages in one output folder. With no arguments: the built-in ViT trained on scikit-learn's "
                   "digits (trained once, cached). Finished stages are reused when their inputs are unchanged; "
                   "--force redoes them.")
    groups = (ModelArgs(), CompressArgs(), Printing(), LimitsArgs("fail (exit 1) when a limit is missed"))

    def add_arguments(self, parser):
        parser.add_argument("--eval-images", help="labelled image folder for accuracy (default: --images)")
        parser.add_argument("--eval-csv", help="CSV of file,label rows for accuracy")
        parser.add_argument("--eval-texts", help="a text model's evaluation texts (one per line, or JSON Lines with "
                                                 "a 'text' field; default: the shipped held-out docstrings)")
        parser.add_argument("--seq-len", type=int, default=128, help="tokens per input when timing a text model")
        parser.add_argument("--out", default="mixrank-out", help="output folder")
        parser.add_argument("--batches", default="1,32", help="batch sizes to time")
        parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
        parser.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default=None,
                            help="engine to build, time and gate (default: onnxruntime)")
        parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                            help="onnxruntime execution provider (default: cpu; cuda and tensorrt need "
                                 "mixrank[gpu])")
        parser.add_argument("--engine-precision", choices=["fp32", "fp16", "int8"], default=None,
                            help="TensorRT's precision (default: fp16), with --engine tensorrt or --provider "
                                 "tensorrt; the factors' own storage is --precision")
        parser.add_argument("--int-weights", choices=INT_WEIGHT_CHOICES, default="auto",
                            help=int_weights_help("on the target at --batches"))
        parser.add_argument("--latency", default=None, metavar="BUDGET",
                            help="a latency budget besides the bytes: a fraction of the original's time on the "
                                 "target such as 0.5x, or milliseconds such as 12ms; each layer's products are "
                                 "timed there once (cached) and the allocation meets both budgets; onnxruntime "
                                 "only; integer weights expanded unless --int-weights dynamic")
        parser.add_argument("--latency-batch", type=int, default=None,
                            help="the batch size --latency is at (default: the largest of --batches)")
        parser.add_argument("--seconds", type=float, default=20.0, help="timing limit per batch size")
        parser.add_argument("--force", action="store_true", help="redo every stage")

    def run(self, args):
        from mixrank.compress.calibrate.distributed import world_size_from_env

        from .._pipeline import RunOptions, run_pipeline
        from .._target import Target

        if world_size_from_env() > 1:
            raise MixrankError("mixrank run is one process; scale the compression out with torchrun ... -m mixrank "
                               "compress, then run the other stages on its factors (mixrank rewrite, build, bench)")
        sizes = batch_sizes(args.batches)
        if args.seq_len < 1:
            raise MixrankError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
        target = Target.from_args(args.engine, args.provider, args.engine_precision, args.threads)
        target.check()  # a machine without the engine fails here, before any work
        like = CompressArgs.like(args)
        cfg = CompressArgs.config(args, tensorrt=target.rewrite_target == "tensorrt", like=like)
        options = RunOptions(
            model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, images=args.images,
            calib_images=args.calib_images, max_image_pixels=args.max_image_pixels, eval_images=args.eval_images,
            eval_csv=args.eval_csv, out=args.out, batch_sizes=sizes, seconds=args.seconds,
            limits=LimitsArgs.path(args), junit=args.junit, force=args.force, progress=not args.quiet, target=target,
            texts=args.texts, eval_texts=args.eval_texts, max_length=args.max_length, seq_len=args.seq_len,
            like=like and like[2], int_weights=args.int_weights, latency=args.latency,
            latency_batch=args.latency_batch)
        return run_pipeline(options, cfg, log(args))

    def show(self, s):
        fp = s["footprint"]
        refs = [r for r in fp if r not in ("original", "compressed")]
        cols = ["original", "compressed", *refs]
        head = ("", *cols, "change")
        rows = _summary_rows(s, fp, cols, refs)
        w = [max(len(r[i]) for r in [*rows, head]) for i in range(len(head))]
        print(f"{s['model']}: {s['method']}, {_budget_text(s)}")
        for r in [head, *rows]:
            print("  ".join([f"{r[0]:<{w[0]}}", *(f"{v:>{w[i]}}" for i, v in enumerate(r[1:-1], 1)),
                             f"{r[-1]:<{w[-1]}}"]))
        if refs:
            from mixrank.exporter import REFERENCES

            for r in refs:
                print(f"{r} = the original quantized by {REFERENCES.get(r, r)}")
        if "smallest" in s:
            print(f"smallest file: {s['smallest']}; fastest: "
                  + ", ".join(f"{s[f'fastest_b{t}']} at batch {t}" for t in (x["batch"] for x in s["throughput"])
                              if f"fastest_b{t}" in s))
        lat = s.get("latency")
        if lat and "measured_ms" in lat:
            print(f"latency budget {lat['asked']} at batch {lat['batch']}: predicted {lat['predicted_ratio']:.3f}x "
                  f"of the original ({lat['predicted_here_ms']:.2f} ms here), measured {lat['measured_ratio']:.3f}x "
                  f"({lat['measured_ms']:.2f} ms): {100 * lat['prediction_error']:+.1f} % of the prediction; budget "
                  f"{'met' if lat['budget_met'] else 'NOT met'}")
        ev = s.get("evaluation") or {}
        text = s.get("kind") == "text"
        if text:
            for what, rec in (("calibration", s.get("calibration") or {}), ("evaluation", ev)):
                print(f"{what} texts: {rec.get('used', rec.get('samples'))} used of {rec.get('read')} read "
                      f"({rec.get('source')}); {rec.get('skipped', 0)} skipped, {rec.get('truncated', 0)} cut "
                      f"to {rec.get('max_length')} tokens")
        if s.get("like"):
            lk = s["like"]
            print(f"budget: the size of {lk['name']} ({lk['countable_params']:,} parameters, "
                  f"{lk['fp32_bytes'] / 1e6:.2f} MB at float32), by {lk['unit']}")
        if ev and not ev.get("held_out", True):
            unit = "texts" if text else "images"
            print(f"note: fidelity was measured on the {ev['samples']} calibration {unit} "
                  f"({ev['source']}), not on held-out data; pass --eval-images or --eval-csv")
        if "check" in s:
            from mixrank.engines import format_results

            print(format_results(s["check"]))
        print(f"artifacts in {s['out']}/ (manifest: {s['manifest']})")


def _summary_rows(s: dict, fp: dict, cols: list[str], refs: list[str]) -> list[tuple]:
    fo, fc = fp["original"], fp["compressed"]
    rows = [("parameters", *(f"{fp[k]['params']:,}" for k in cols), f"{s['param_ratio']:.3f}x"),
            ("file MB", *(f"{fp[k]['file_bytes'] / 1e6:.2f}" for k in cols),
             f"{s['file_bytes_ratio']:.3f}x" + (f" ({s['bytes_ratio_vs_int8']:.2f}x of int8)"
                                                 if "bytes_ratio_vs_int8" in s else "")),
            ("peak RSS MB (ORT, b1)", *(f"{fp[k]['peak_rss_bytes'] / 1e6:.1f}" for k in cols),
             f"{(fc['peak_rss_bytes'] - fo['peak_rss_bytes']) / 1e6:+.1f} MB")]
    at = f", {s['seq_len']} tokens" if s.get("seq_len") else ""
    for t in s["throughput"]:
        vs = s.get(f"speedup_vs_fastest_int8_b{t['batch']}")
        rows.append((f"latency p50 ms, batch {t['batch']}{at}", *(f"{t['p50_ms'][k]:.2f}" for k in cols),
                     f"{t['speedup']:.2f}x (FLOP ideal {t['ideal_speedup']:.2f}x)"
                     + ("" if vs is None else f"; {vs:.2f}x of the faster int8")))
    if "top1_original" in s:
        rows.append(("top-1 accuracy %", f"{100 * s['top1_original']:.2f}", f"{100 * s['top1_compressed']:.2f}",
                     *(f"{100 * s[f'{r}_top1']:.2f}" for r in refs), f"{-100 * s['top1_drop']:+.2f} pt"))
    if "top1_agreement" in s:
        rows.append(("top-1 agreement %", "", f"{100 * s['top1_agreement']:.2f}",
                     *(f"{100 * s[f'{r}_top1_agreement']:.2f}" for r in refs), ""))
    elif "cosine_mean" in s:
        for key, label in (("cosine_mean", "embedding cosine, mean"), ("cosine_p5", "embedding cosine, 5th pct")):
            rows.append((label, "", f"{s[key]:.4f}", *(f"{s[f'{r}_{key}']:.4f}" for r in refs), ""))
    return rows


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
