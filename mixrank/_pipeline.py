"""``mixrank run``: every stage in one output folder, each stage reused when its inputs
have not changed (keyed by a hash of its inputs), with a manifest of every artifact.

Data flows one way through files (docs/design.md, "Architecture"): the model and the
calibration images give the factors file; the model gives original.onnx; the two give
compressed.onnx; each ONNX file gives an engine; the engines give the report.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mixrank.compress import (
    CompressConfig,
    atomic_write_text,
    check_writable_path,
    compress_model,
    load_factors,
    model_fingerprint,
    output_folder,
    save_factors,
    sha256_file,
)
from mixrank.engines import (
    TimingConfig,
    build_report,
    check_report,
    junit_xml,
    load_budget,
    measure,
    write_report,
)
from mixrank.exporter import export_onnx, quantize_reference, rewrite_onnx, verify_rewrite

from ._sources import ModelSource


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Manifest:
    """``manifest.json``: per stage its input key and seconds; per artifact its
    SHA-256, the stage that made it and the command line."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        self.path = out / "manifest.json"
        self.force = force
        self.data = {"stages": {}, "artifacts": {}}
        if self.path.is_file() and not force:
            try:
                self.data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        self.command = " ".join(["mixrank", *sys.argv[1:]]) if sys.argv else "mixrank"

    def fresh(self, stage: str, key: str, files: list[str]) -> bool:
        st = self.data["stages"].get(stage)
        if self.force or not st or st.get("key") != key:
            return False
        for f in files:
            p = self.out / f
            art = self.data["artifacts"].get(f)
            if not p.is_file() or not art or art["sha256"] != sha256_file(p):
                return False
        return True

    def record(self, stage: str, key: str, files: list[str], seconds: float, extra=None) -> None:
        self.data["stages"][stage] = {"key": key, "seconds": round(seconds, 3), **(extra or {})}
        for f in files:
            self.data["artifacts"][f] = {"sha256": sha256_file(self.out / f), "stage": stage,
                                         "bytes": (self.out / f).stat().st_size,
                                         "command": self.command}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def stage(self, name: str, key: str, files: list[str], fn: Callable[[], dict | None],
              log: Callable[[str], None]) -> tuple[dict, bool]:
        """Run ``fn`` unless the stage is fresh; returns (stage record, reused)."""
        if self.fresh(name, key, files):
            log(f"[{name}] up to date, reused")
            return self.data["stages"][name], True
        log(f"[{name}] running")
        t0 = time.perf_counter()
        extra = fn() or {}
        self.record(name, key, files, time.perf_counter() - t0, extra)
        return self.data["stages"][name], False


def warn(msg: str) -> None:
    """A warning the user must see even with --quiet: one line on stderr."""
    print(f"mixrank: warning: {msg}", file=sys.stderr)


def run_pipeline(args, cfg: CompressConfig, log: Callable[[str], None]) -> dict:
    """The main job: model → calibration → compress → export → rewrite → engines →
    measure → report → check. Returns the summary.

    The output folder is locked for the whole run (one writer per folder); a run that
    fails before its first stage leaves no folder it created behind.
    """
    if args.junit:
        check_writable_path(args.junit)
    with output_folder(args.out, " ".join(["mixrank", *sys.argv[1:]])) as out:
        return _run(args, cfg, log, out)


def _run(args, cfg: CompressConfig, log: Callable[[str], None], out: Path) -> dict:
    man = Manifest(out, args.force)
    progress = not args.quiet
    limits = load_budget(args.budget) if args.budget else None  # a bad budget fails first
    torch.manual_seed(cfg.seed)
    src = ModelSource(args.model, args.pretrained, args.checkpoint, progress, args.max_image_pixels, warn)
    model = src.model
    mfp = model_fingerprint(model)
    calib = src.calibration(args.images, args.calib_images, cfg.seed)
    ev = src.evaluation(args.eval_images, args.eval_csv, fallback=calib)
    eval_x, eval_y = ev.x, ev.labels
    source = {"model": src.label, "calibration": calib.source, "calibration_images": calib.record}

    def do_compress():
        f = compress_model(model, calib.batches, cfg, source=source, progress=progress)
        save_factors(f, out / "model.mixrank.safetensors")
        return {"summary": f.summary()}

    k_comp = _key(mfp, calib.key, cfg.to_dict())
    man.stage("compress", k_comp, ["model.mixrank.safetensors"], do_compress, log)
    factors = load_factors(out / "model.mixrank.safetensors")

    def do_export():
        export_onnx(model, eval_x[:2], out / "original.onnx", check_inputs=eval_x[:16])

    man.stage("export", _key(mfp, list(eval_x.shape[1:]), 17), ["original.onnx"], do_export, log)

    def do_reference():  # what a user gets without mixrank: onnxruntime's int8 weight-only quantizer
        quantize_reference(out / "original.onnx", out / "original.int8.onnx", bits=8, block=32)

    if args.target.has_int8_reference:
        man.stage("reference", _key(sha256_file(out / "original.onnx"), "int8", 32), ["original.int8.onnx"],
                  do_reference, log)

    target = args.target
    comp_onnx = "compressed.onnx" if target.rewrite_target == "onnxruntime" else "compressed.tensorrt.onnx"

    def do_rewrite():
        rep = rewrite_onnx(out / "original.onnx", factors, out / comp_onnx, target=target.rewrite_target)
        atomic_write_text(out / "rewrite.json", json.dumps(rep.to_dict(), indent=1))
        v = verify_rewrite(out / comp_onnx, model, factors, eval_x[:64])
        return {"verify": v["outputs"]}

    k_rw = _key(sha256_file(out / "original.onnx"), sha256_file(out / "model.mixrank.safetensors"),
                target.rewrite_target)
    man.stage("rewrite", k_rw, [comp_onnx, "rewrite.json"], do_rewrite, log)
    settings = target.settings(args.batch_sizes)
    graphs = {"original": "original.onnx", "compressed": comp_onnx}
    if target.has_int8_reference:
        graphs["original.int8"] = "original.int8.onnx"
    else:
        log(f"no int8 reference on {target.label()}: onnxruntime's int8 quantizer writes MatMulNBits, which "
            "TensorRT cannot run")
    built = {tag: target.artifact(tag) for tag in graphs}

    def do_build():
        calib_x = [b.numpy() for b in calib.batches] if target.engine == "tensorrt" else None
        for tag, onnx_file in graphs.items():
            target.build(out / onnx_file, out / built[tag], settings, calib_x)

    k_build = _key(k_rw, *(sha256_file(out / g) for g in graphs.values()), settings.to_dict(), target.describe())
    man.stage("build", k_build, list(built.values()), do_build, log)

    def do_bench():
        refs = ({"int8": (out / built["original.int8"], out / graphs["original.int8"])}
                if "original.int8" in built else None)
        res = measure(out / built["original"], out / built["compressed"], args.batch_sizes, settings,
                      eval_x.numpy(), None if eval_y is None else eval_y.numpy(),
                      TimingConfig(max_seconds=args.seconds), progress=progress, engine=target.engine,
                      graphs=(out / graphs["original"], out / graphs["compressed"]), references=refs)
        res["target"] = target.describe()
        for tag, name in (("original", "original"), ("compressed", "compressed"), ("int8", "original.int8")):
            if name in built:
                res["footprint"][tag]["engine_bytes"] = (out / built[name]).stat().st_size
        res["evaluation"] = {"source": ev.source, "held_out": ev.held_out, "samples": len(eval_x),
                             **ev.record, "note": ev.note}
        rep = build_report(res, factors.plan, json.loads((out / "rewrite.json").read_text()))
        rep["summary"]["engine_bytes"] = res["footprint"]["compressed"]["engine_bytes"]
        write_report(rep, out)

    k_bench = _key(k_build, args.batch_sizes, args.seconds, calib.key, ev.key)
    man.stage("bench", k_bench, ["report.json", "report.md"], do_bench, log)
    rep = json.loads((out / "report.json").read_text())
    budget = factors.plan.budget
    used = {}
    for i in factors.layers.values():
        used[i.precision] = used.get(i.precision, 0) + 1
    summary = {"out": str(out), "model": source["model"], "method": cfg.method, "keep": budget.keep,
               "target": rep["measurement"].get("target", {"engine": rep["measurement"]["engine"]}),
               "budget": {"keep": budget.keep, "params": budget.params, "bytes": budget.bytes,
                          "precision": budget.precision, "precisions": used},
               **rep["summary"], "footprint": rep["measurement"]["footprint"],
               "evaluation": rep["measurement"].get("evaluation", {}),
               "notes": [n for n in (calib.note, ev.note) if n],
               "throughput": [{k: v for k, v in t.items() if k != "sessions"} |
                              {"p50_ms": {n: s["p50_ms"] for n, s in t["sessions"].items()}}
                              for t in rep["measurement"]["throughput"]],
               "manifest": str(man.path)}
    if limits:
        verdict = check_report(rep, limits)
        summary["check"] = verdict
        atomic_write_text(out / "check.json", json.dumps(verdict, indent=1))
        if args.junit:
            atomic_write_text(Path(args.junit), junit_xml(verdict))
    return summary
