"""The subcommands that load the PyTorch model: ``compress``, ``export`` and ``eval``."""

from __future__ import annotations

from mixrank.core import MixrankError, warn

from ._args import CompressArgs, ModelArgs, Overwrite, PinnedDigest, Printing, Tool, output


class Compress(Tool):
    name = "compress"
    help = "compress a model into a factors file"
    groups = (ModelArgs(), CompressArgs(), Printing(), Overwrite())

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", default="model.mixrank.safetensors", help="factors file")

    def run(self, args):
        from mixrank.compress import compress_model, distributed, save_factors

        from .._sources import ModelSource, check_texts

        like = CompressArgs.like(args)
        cfg = CompressArgs.config(args, like=like)
        output(args.output, args.checkpoint, overwrite=args.overwrite)  # before the work, not after it
        check_texts(args.texts)  # a bad text file fails before the model loads
        ranks = distributed.init_from_env(cfg.device)  # under torchrun: data parallel (docs/design.md)
        writer = distributed.is_writer()
        src = ModelSource(args.model, args.pretrained, args.checkpoint, not args.quiet, args.max_image_pixels,
                          warn if writer else None, max_length=args.max_length)
        cfg = src.configure(cfg)
        calib = src.calibration(args.images, args.calib_images, cfg.seed, texts=args.texts)
        f = compress_model(src.model, calib.batches, cfg, progress=not args.quiet and writer,
                           source=src.source(calib, like and like[2]))
        out = {"summary": f.summary(), "totals": f.plan.totals, "ranks": distributed.world(),
               "seconds": round(f.timings.get("total_s", 0.0), 2)}
        if writer:
            out["factors"] = str(save_factors(f, args.output))
        if ranks:
            distributed.barrier()  # no rank leaves before the file is written
        return out


class Export(Tool):
    name = "export"
    help = "export the original model to ONNX (checked against PyTorch)"
    groups = (ModelArgs(), Printing(), Overwrite())

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", default="original.onnx", help="ONNX file")
        parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
        parser.add_argument("--fp16", action="store_true", help="float16 model (TensorRT 11)")
        parser.add_argument("--static-batch", action="store_true", help="fixed batch dimension")

    def run(self, args):
        from mixrank.exporter import check_opset, export_onnx

        from .._sources import ModelSource, check_texts

        check_opset(args.opset, "--opset")
        output(args.output, args.checkpoint, overwrite=args.overwrite)
        check_texts(args.texts)
        src = ModelSource(args.model, args.pretrained, args.checkpoint, not args.quiet, max_length=args.max_length)
        example = src.example(args.texts)
        rep = export_onnx(src.model, example, args.output, opset=args.opset, fp16=args.fp16,
                          dynamic_batch=not args.static_batch, input_name=src.input_names[0],
                          output_name=src.output_name)
        return {"onnx": args.output, "inputs": list(src.input_names), "output": src.output_name,
                "verify": rep["outputs"]}


class Eval(Tool):
    name = "eval"
    help = "top-1/top-5 of the original, factored and ONNX models"
    groups = (ModelArgs(), PinnedDigest(), Printing())

    def add_arguments(self, parser):
        parser.add_argument("--csv", help="CSV of file,label rows")
        parser.add_argument("--factors", help="factors file: also evaluate the factored PyTorch model")
        parser.add_argument("--onnx", nargs="*", help="ONNX files to evaluate too")

    def run(self, args):
        import torch

        from mixrank.compress import apply_factors
        from mixrank.engines import make_runner, run_all
        from mixrank.exporter import load_onnx, topk_accuracy

        from .._sources import ModelSource

        src = ModelSource(args.model, args.pretrained, args.checkpoint, not args.quiet, args.max_image_pixels, warn)
        if src.kind == "text":
            raise MixrankError("mixrank eval scores top-1 on labelled images; a text model's fidelity (embedding "
                               "cosine) is measured by mixrank run and mixrank bench --model ... --eval-texts")
        data = src.evaluation(args.images, args.csv)
        if data.labels is None:
            raise MixrankError(f"{args.images} is a flat folder: labels need one sub-folder per class or --csv")
        x, y = data.x, data.labels.numpy()
        factors = PinnedDigest.load(args, args.factors) if args.factors or args.require_digest else None
        results = {}

        def score(name, logits):
            results[name] = {**topk_accuracy(logits, y), "images": int(len(y))}

        def logits(model):
            return torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy()

        with torch.no_grad():
            score("pytorch original", logits(src.model))
            if factors is not None:
                score("pytorch factored", logits(apply_factors(src.model, factors).eval()))
        for path in args.onnx or []:
            load_onnx(path)  # a missing or corrupt file is named here
            score(f"onnx {path}", run_all(make_runner("onnxruntime", path), x.numpy(), 64))
        return {"results": results, "data": data.source, "data_record": data.record}

    def show(self, r):
        w = max(len(k) for k in r["results"])
        for k, v in r["results"].items():
            print(f"{k:<{w}}  top-1 {100 * v['top1']:6.2f} %  top-5 {100 * v['top5']:6.2f} %  ({v['images']} images)")
