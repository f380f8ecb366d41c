"""``mixrank run``: every stage in one output folder, each stage reused when its inputs
have not changed (keyed by a hash of its inputs), with a manifest of every artifact."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compress import MixrankError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            except json.JSONDecodeError:
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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

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


def run_pipeline(args, log: Callable[[str], None]) -> dict:
    """The main job: model → calibration → compress → export → rewrite → engines →
    measure → report → check. Returns the summary."""
    from compress import (
        CompressConfig,
        compress_model,
        image_csv,
        image_folder,
        load_factors,
        model_fingerprint,
        save_factors,
    )
    from engines import (
        OrtSettings,
        TimingConfig,
        build_report,
        check_report,
        load_budget,
        measure,
        write_report,
    )
    from engines._ort import build_ort

    from ._export import export_onnx
    from ._models import DIGITS, load_model
    from ._rewrite import rewrite_onnx
    from ._verify import verify_rewrite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    man = Manifest(out, args.force)
    progress = not args.quiet
    limits = load_budget(args.budget) if args.budget else None  # a bad budget fails first
    batches = tuple(int(b) for b in args.batches.split(","))
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.pretrained, args.checkpoint, progress)
    mfp = model_fingerprint(model)
    # calibration and evaluation data
    if args.model in (None, DIGITS):
        from compress._demo import digits_calibration, digits_data

        _, _, xte, yte = digits_data()
        calib = digits_calibration(args.calib_images)
        n = sum(len(b) for b in calib)
        eval_x, eval_y = xte, yte
        data_key = ["digits", n]
        source = {"model": "digits_vit (built-in)", "calibration": "sklearn digits, train split"}
    else:
        if not args.images:
            raise MixrankError("a timm model needs calibration images: pass --images DIR "
                               "(a flat folder or one sub-folder per class)")
        data = image_folder(args.images, model, count=args.calib_images, seed=args.seed)
        calib = data.batches
        ev = image_csv(args.eval_csv, model) if args.eval_csv else (
            image_folder(args.eval_images, model) if args.eval_images else data)
        eval_x = torch.cat(ev.batches)
        eval_y = torch.tensor(ev.labels) if ev.labels else None
        data_key = [sorted(data.files), args.seed]
        source = {"model": args.model, "calibration": str(args.images)}
    cfg = CompressConfig(method=args.method, keep=args.keep, seed=args.seed)

    def do_compress():
        f = compress_model(model, calib, cfg, source=source, progress=progress)
        save_factors(f, out / "model.mixrank.safetensors")
        return {"summary": f.summary()}

    k_comp = _key(mfp, data_key, cfg.to_dict())
    man.stage("compress", k_comp, ["model.mixrank.safetensors"], do_compress, log)
    factors = load_factors(out / "model.mixrank.safetensors")

    def do_export():
        export_onnx(model, eval_x[:2], out / "original.onnx", check_inputs=eval_x[:16])

    man.stage("export", _key(mfp, list(eval_x.shape[1:]), 17), ["original.onnx"], do_export, log)

    def do_rewrite():
        rep = rewrite_onnx(out / "original.onnx", factors, out / "compressed.onnx")
        (out / "rewrite.json").write_text(json.dumps(rep.to_dict(), indent=1))
        v = verify_rewrite(out / "compressed.onnx", model, factors, eval_x[:64])
        return {"verify": v["outputs"]}

    k_rw = _key(sha256_file(out / "original.onnx"), sha256_file(out / "model.mixrank.safetensors"))
    man.stage("rewrite", k_rw, ["compressed.onnx", "rewrite.json"], do_rewrite, log)
    settings = OrtSettings(threads=args.threads)

    def do_build():
        for tag in ("original", "compressed"):
            build_ort(out / f"{tag}.onnx", out / f"{tag}.ort.onnx", settings)

    k_build = _key(k_rw, settings.to_dict())
    man.stage("build", k_build, ["original.ort.onnx", "compressed.ort.onnx"], do_build, log)

    def do_bench():
        res = measure(out / "original.onnx", out / "compressed.onnx", batches, settings,
                      eval_x.numpy(), None if eval_y is None else eval_y.numpy(),
                      TimingConfig(max_seconds=args.seconds), progress=progress)
        for tag in ("original", "compressed"):
            res["footprint"][tag]["engine_bytes"] = (out / f"{tag}.ort.onnx").stat().st_size
        rep = build_report(res, factors.plan, json.loads((out / "rewrite.json").read_text()))
        rep["summary"]["engine_bytes"] = res["footprint"]["compressed"]["engine_bytes"]
        write_report(rep, out)

    k_bench = _key(k_build, batches, args.seconds, data_key)
    man.stage("bench", k_bench, ["report.json", "report.md"], do_bench, log)
    rep = json.loads((out / "report.json").read_text())
    summary = {"out": str(out), "model": source["model"], "method": args.method, "keep": args.keep,
               **rep["summary"], "footprint": rep["measurement"]["footprint"],
               "throughput": [{k: v for k, v in t.items() if k != "sessions"} |
                              {"p50_ms": {n: s["p50_ms"] for n, s in t["sessions"].items()}}
                              for t in rep["measurement"]["throughput"]],
               "manifest": str(man.path)}
    if limits:
        verdict = check_report(rep, limits)
        summary["check"] = verdict
        (out / "check.json").write_text(json.dumps(verdict, indent=1))
        if args.junit:
            from engines import junit_xml

            Path(args.junit).write_text(junit_xml(verdict))
    return summary
