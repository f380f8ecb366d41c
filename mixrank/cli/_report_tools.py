"""The subcommands that measure and gate: ``bench`` (a report of two ONNX models) and
``check`` (a report against a limits file, the CI gate)."""

from __future__ import annotations

import sys
from pathlib import Path

from mixrank.core import MixrankError

from ._args import LimitsArgs, PinnedDigest, Printing, Tool, batch_sizes, output, write_junit


class Bench(Tool):
    name = "bench"
    help = "measure original vs compressed side by side, write the report"
    description = ("Footprint (parameters, bytes, peak RSS in child processes), throughput per batch size "
                   "(interleaved rounds) and fidelity of two ONNX models on onnxruntime; writes report.json, "
                   "report.md and plots; checks a limits file if given.")
    groups = (LimitsArgs("the limits to check the report against"), PinnedDigest(),
              Printing("print the summary as JSON", "no progress bars"))

    def add_arguments(self, parser):
        parser.add_argument("original", help="original ONNX model")
        parser.add_argument("compressed", help="compressed ONNX model")
        parser.add_argument("--factors", help="factors file (adds the per-layer table and plot)")
        parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
        parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
        parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
        parser.add_argument("--inputs", help=".npy array of preprocessed inputs for fidelity")
        parser.add_argument("--labels", help=".npy array of integer labels (top-1/top-5 accuracy)")
        parser.add_argument("--model", help="a text model's Hugging Face folder (or minilm): its tokenizer reads "
                                            "--eval-texts for fidelity (its weights are not loaded)")
        parser.add_argument("--eval-texts", help="texts for fidelity, one per line or JSON Lines (default with "
                                                 "--model: the shipped held-out docstrings)")
        parser.add_argument("--max-length", type=int, default=128, help="tokens per text; longer texts are cut")
        parser.add_argument("--seq-len", type=int, default=128, help="tokens per input when timing a text model")
        parser.add_argument("--refs", default="",
                            help="also measure the original quantized by onnxruntime's own quantizers, written to "
                                 "the report folder: a comma-separated list of int8_dynamic (quantize_dynamic, int8 "
                                 "per channel), int8, int4 (weight-only MatMulNBits, block 32)")
        parser.add_argument("--int8", action="store_true", help="the same as --refs int8")
        parser.add_argument("--seconds", type=float, default=30.0, help="time limit per batch size")
        parser.add_argument("--out", default="mixrank-out", help="report folder")

    def run(self, args):
        from mixrank.core import output_folder
        from mixrank.engines import (
            OrtSettings,
            TimingConfig,
            build_report,
            check_report,
            load_limits,
            measure,
            write_report,
        )
        from mixrank.exporter import check_references, write_reference

        batches = batch_sizes(args.batches)
        names = check_references([*check_references(args.refs), *(["int8"] if args.int8 else [])])
        limits_file = LimitsArgs.path(args)
        limits = load_limits(limits_file) if limits_file else None  # fail early on a bad limits file
        plan = PinnedDigest.load(args, args.factors).plan if args.factors or args.require_digest else None
        if args.seq_len < 1:
            raise MixrankError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
        inputs, labels, evaluation = _fidelity_inputs(args)
        if args.junit:
            output(args.junit)
        with output_folder(args.out, " ".join(["mixrank", *sys.argv[1:]])) as out:
            refs = {n: write_reference(n, args.original, out / f"original.{n}.onnx") for n in names} or None
            res = measure(args.original, args.compressed, batches,
                          OrtSettings(provider=args.provider, threads=args.threads), inputs, labels,
                          TimingConfig(max_seconds=args.seconds), progress=not args.quiet, references=refs,
                          seq_len=args.seq_len, output="embedding" if _embedding(args.original) else "logits")
            if evaluation:
                res.evaluation = evaluation
            rep = build_report(res, plan)
            paths = write_report(rep, out)
        result = {"report": {k: str(v) for k, v in paths.items()}, "summary": rep["summary"]}
        if limits:
            verdict = check_report(rep, limits)
            result["check"] = verdict
            write_junit(args.junit, verdict)
        return result

    def show(self, r):
        print(Path(r["report"]["md"]).read_text())
        if "check" in r:
            from mixrank.engines import format_results

            print(format_results(r["check"]))
        print("report: " + ", ".join(r["report"].values()))


def _fidelity_inputs(args) -> tuple:
    """(inputs, labels, evaluation record) for fidelity: ``--inputs``/``--labels`` arrays, or
    ``--model`` with ``--eval-texts``, tokenised for the graph's inputs; ``(None, None,
    None)`` without either."""
    inputs, labels = _load_array(args.inputs), _load_array(args.labels)
    if args.model is not None or args.eval_texts is not None:
        if args.model is None:
            raise MixrankError("--eval-texts needs --model (the Hugging Face folder whose tokenizer reads them)")
        if inputs is not None or labels is not None:
            raise MixrankError("give --inputs/--labels arrays or --model with texts, not both")
        from mixrank.core import warn
        from mixrank.exporter import load_onnx

        from .._sources import text_feeds

        g = load_onnx(args.original).graph
        inits = {t.name for t in g.initializer}
        names = tuple(i.name for i in g.input if i.name not in inits)
        data = text_feeds(args.model, args.eval_texts, names, args.max_length, warn)
        held = True if args.eval_texts is None else None  # the shipped texts are disjoint from the shipped calibration
        return data.feeds(names), None, {"source": data.source, "held_out": held, "samples": data.count,
                                         **data.record, "note": data.note}
    if labels is not None and (inputs is None or len(labels) != len(inputs)):
        raise MixrankError(f"--labels has {len(labels)} labels but --inputs has "
                           f"{'no' if inputs is None else len(inputs)} inputs; give one label per input")
    return inputs, labels, None


def _embedding(onnx_path: str) -> bool:
    """The graph's first output is a sentence embedding (mixrank's export names it so)."""
    from mixrank.exporter import load_onnx

    return load_onnx(onnx_path).graph.output[0].name == "embedding"


def _load_array(path: str | None):
    import numpy as np

    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise MixrankError(f"cannot read {path} as a .npy array: {e}") from None


class Check(Tool):
    name = "check"
    help = "check a report against a limits file (the CI gate)"
    description = ("Exit 0 when every limit passes, 1 when a limit fails, 3 when a limit could not be measured, "
                   "2 on a usage error.")
    groups = (Printing("print the results as JSON", None),)

    def add_arguments(self, parser):
        parser.add_argument("report", help="report.json from mixrank bench / run")
        parser.add_argument("limits", help="TOML limits file")
        parser.add_argument("--junit", help="write the results as JUnit XML here")

    def run(self, args):
        from mixrank.engines import check_report, load_limits, read_report

        if args.junit:
            output(args.junit, args.report, args.limits)
        verdict = check_report(read_report(args.report), load_limits(args.limits))
        write_junit(args.junit, verdict)
        return verdict

    def exit_code(self, result):
        return result["exit_code"]

    def show(self, r):
        from mixrank.engines import format_results

        print(format_results(r))
        print({0: "all limits pass", 1: "a limit failed", 3: "something could not be measured"}[r["exit_code"]])
