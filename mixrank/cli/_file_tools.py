"""The subcommands that work on files alone, without the PyTorch model: ``rewrite``,
``build`` and ``inspect``."""

from __future__ import annotations

from pathlib import Path

from mixrank.core import MixrankError

from ._args import (
    INT_WEIGHT_CHOICES,
    Overwrite,
    PinnedDigest,
    Printing,
    Tool,
    batch_sizes,
    deprecated,
    int_weights_help,
    output,
)


class Rewrite(Tool):
    name = "rewrite"
    help = "rewrite an ONNX model's MatMuls with a factors file (no PyTorch model needed)"
    description = ("Replace every constant-weight MatMul/Gemm that has factors by its low-rank-plus-sparse "
                   "subgraph; matches by initializer name, else by weight fingerprint, so ONNX files from other "
                   "exporters work too.")
    groups = (Overwrite(), PinnedDigest(), Printing("print the rewrite report as JSON"))

    def add_arguments(self, parser):
        parser.add_argument("onnx", help="input ONNX model")
        parser.add_argument("factors", help="factors file (model.mixrank.safetensors)")
        parser.add_argument("-o", "--output", required=True, help="rewritten ONNX model to write")
        parser.add_argument("--allow-partial", action="store_true",
                            help="rewrite what matches even if some factors match no node")
        parser.add_argument("--allow-mismatch", action="store_true",
                            help="apply factors to a layer matched by name even if its weight is not the one they "
                                 "were computed from (recorded in the report)")
        parser.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                            help="engine the integer weights are written for")
        parser.add_argument("--int-weights", choices=INT_WEIGHT_CHOICES, default="packed",
                            help=int_weights_help("on this machine's CPU at --batches"))
        parser.add_argument("--batches", default="1,32", help="batch sizes --int-weights auto times")

    def run(self, args):
        from mixrank.engines import rewrite_fastest
        from mixrank.exporter import check_onnx_output, check_tensorrt_compat

        check_onnx_output(args.output, args.onnx, args.factors, overwrite=args.overwrite)
        factors = PinnedDigest.load(args, args.factors)
        rep, choice = rewrite_fastest(args.onnx, factors, args.output, args.int_weights, batch_sizes(args.batches),
                                      allow_partial=args.allow_partial, allow_mismatch=args.allow_mismatch,
                                      target=args.target)
        out = {**rep.to_dict(), "weights_choice": choice}
        out["tensorrt_check"] = check_tensorrt_compat(args.output)
        return out

    def show(self, r):
        print(f"rewrote {len(r['rewritten'])} MatMul/Gemm node(s): weight parameters "
              f"{r['params_before']:,} -> {r['params_after']:,}")
        for d in r["dense"]:
            print(f"  left dense: {d['node']} ({d.get('weight', '')}): {d['reason']}")
        if r.get("mismatched"):
            print(f"  WARNING: applied despite a different weight (--allow-mismatch): {', '.join(r['mismatched'])}")
        if r["unmatched_factors"]:
            print(f"  factors matching no node: {', '.join(r['unmatched_factors'])}")
        trt = r["tensorrt_check"]
        counts: dict[str, int] = {}  # one line per kind of problem, with how many nodes have it
        for p in trt["problems"]:
            line = p.get("op", p.get("what", "")) + ": " + p["detail"]
            counts[line] = counts.get(line, 0) + 1
        print(f"TensorRT {trt['tensorrt']}: " + ("all operators supported" if trt["ok"] else
              "; ".join(f"{line}{f' ({n} nodes)' if n > 1 else ''}" for line, n in counts.items())))
        print(f"wrote {r['output']}")


class Build(Tool):
    name = "build"
    help = "build an engine from an ONNX file"
    description = ("onnxruntime: save the graph onnxruntime optimises for these settings; tensorrt: build and "
                   "serialize a TensorRT engine (needs the tensorrt package and an NVIDIA GPU).")
    groups = (Overwrite(), Printing("print the build record as JSON", None))

    def add_arguments(self, parser):
        parser.add_argument("onnx", help="ONNX model")
        parser.add_argument("-o", "--output", required=True, help="engine file to write")
        parser.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
        parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                            help="onnxruntime execution provider")
        parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
        parser.add_argument("--engine-precision", choices=["fp32", "fp16", "int8"], default=None,
                            help="TensorRT 10's precision flag (TensorRT 11 takes it from the ONNX file; "
                                 "default: fp16)")
        parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                            help="deprecated name of --engine-precision")
        parser.add_argument("--workspace-mb", type=int, default=2048, help="TensorRT workspace limit")
        parser.add_argument("--max-batch", type=int, default=32, help="TensorRT profile max batch")

    def run(self, args):
        output(args.output, args.onnx, overwrite=args.overwrite)
        precision = args.engine_precision
        if args.precision is not None:
            if precision is not None:
                raise MixrankError("give --engine-precision or its deprecated name --precision, not both")
            deprecated("build --precision", "--engine-precision (--precision is the factors' storage)")
            precision = args.precision
        if args.engine == "tensorrt":
            from mixrank.engines import TrtSettings, build_engine

            st = TrtSettings(precision=precision or "fp16", workspace_mb=args.workspace_mb,
                             max_batch=args.max_batch, opt_batch=min(8, args.max_batch))
            rec = build_engine(args.onnx, args.output, st)
            rec.pop("layers", None)
            return rec
        from mixrank.engines import OrtSettings, build_ort

        return build_ort(args.onnx, args.output, OrtSettings(provider=args.provider, threads=args.threads))

    def show(self, r):
        print(f"built {r.get('engine', 'tensorrt')} engine {r.get('engine_path', '')} "
              f"({r['engine_bytes']:,} bytes, {r['build_seconds']:.1f} s)")


class Inspect(Tool):
    name = "inspect"
    help = "summarise a factors file, an ONNX file or a report"
    groups = (PinnedDigest(), Printing("print as JSON", None))

    def add_arguments(self, parser):
        parser.add_argument("file", help="model.mixrank.safetensors, *.onnx or report.json")

    def run(self, args):
        p = Path(args.file)
        if not p.is_file():
            raise MixrankError(f"{p} does not exist")
        if p.suffix == ".safetensors":
            return _factors_summary(PinnedDigest.load(args, p), p)
        if args.require_digest is not None:
            from mixrank.compress import check_pinned_digest

            check_pinned_digest(p, args.require_digest)
        if p.suffix == ".onnx":
            return _onnx_summary(p)
        if p.suffix == ".json":
            from mixrank.engines import read_report

            return {"kind": "report", "summary": read_report(p)["summary"]}
        raise MixrankError(f"cannot inspect {p}: expected a factors file (.safetensors), an ONNX file or a "
                           "report (.json)")

    def show(self, r):
        if r["kind"] == "factors":
            print(r["summary"])
            for n, i in r["layers"].items():
                print(f"  {n:<32} {_layer_form(i):<34} {i['bytes']:,} bytes")
        elif r["kind"] == "onnx":
            print(f"{r['params']:,} parameters, {r['initializer_bytes']:,} initializer bytes, "
                  f"{r['file_bytes']:,} file bytes, opset {r['opset']}")
            print("  ops: " + ", ".join(f"{k}x{v}" for k, v in sorted(r["ops"].items())))
            print("  TensorRT: " + ("ok" if r["tensorrt_check"]["ok"] else str(r["tensorrt_check"]["problems"])))
        else:
            for k, v in r["summary"].items():
                print(f"  {k:<28} {v}")


def _layer_form(i: dict) -> str:
    """One layer as `inspect` shows it: dense at its width, or the form, rank and precision with
    the factors' NMSE (a dense layer's error is not measured per layer)."""
    block = f" b{i['block']}" if i.get("block") else ""
    if i.get("dense"):
        return f"dense {i['precision']}{block}"
    form = i.get("form", "lowrank")
    extra = {"lowrank": "", "residual": f" + Q {i.get('residual')}"}.get(form, f" (pair {i.get('pair')})")
    sparse = "" if i["sparse"] == "none" else f" + {i['sparse']} k={i['k']}"
    return f"{form} rank {i['rank']} {i['precision']}{block}{extra}{sparse}  NMSE {i['nmse']:.2e}"


def _factors_summary(f, p: Path) -> dict:
    return {"kind": "factors", "summary": f.summary(), "method": f.plan.method,
            "budget": f.plan.budget, "totals": f.plan.totals,
            "layers": {n: {"rank": i.rank, "precision": i.precision, "sparse": i.sparse.structure,
                           "k": i.sparse.k, "nmse": i.nmse, "bytes": i.bytes_after, "form": i.form,
                           "dense": i.dense, "block": i.block, "pair": i.pair,
                           "residual": (f"{i.residual_precision} b{i.residual_block}" if i.residual_precision
                                        else None)}
                       for n, i in f.layers.items()}}


def _onnx_summary(p: Path) -> dict:
    from mixrank.engines import onnx_params
    from mixrank.exporter import check_tensorrt_compat, load_onnx

    m = load_onnx(p)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"kind": "onnx", **onnx_params(p), "opset": [o.version for o in m.opset_import],
            "inputs": [i.name for i in m.graph.input], "ops": ops, "tensorrt_check": check_tensorrt_compat(m)}
