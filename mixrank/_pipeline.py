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
from dataclasses import dataclass
from pathlib import Path

import torch

from mixrank.compress import (
    CompressConfig,
    LatencyBudget,
    LatencyTable,
    compress_model,
    latency_layers,
    load_factors,
    model_fingerprint,
    save_factors,
)
from mixrank.core import (
    MixrankError,
    atomic_write_text,
    check_writable_path,
    json_text,
    loads_json,
    output_folder,
    sha256_file,
    warn,
)
from mixrank.engines import (
    TimingConfig,
    build_report,
    check_report,
    junit_xml,
    latency_table,
    load_limits,
    measure,
    rewrite_fastest,
    write_report,
)
from mixrank.exporter import export_onnx, verify_rewrite, write_reference

from ._sources import ModelSource, check_texts, held_out_texts
from ._target import Target
from ._texts import MAX_LENGTH

SEQ_LEN = 128  # engines.runners.SEQ_LEN, the tokens per input a text model is timed at (not imported: lazy)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Which stage's files each stage reads: a stage that reruns first removes every stage's
# files that depend on it, so that no folder holds one run's report beside another's factors.
DEPENDS = {"compress": (), "export": (), "reference": ("export",), "rewrite": ("compress", "export"),
           "build": ("export", "reference", "rewrite"), "bench": ("build",), "check": ("bench",)}
# under a latency budget the original is exported and timed first, and the compression reads the table
LATENCY_DEPENDS = {**DEPENDS, "latency": ("export",), "compress": ("latency",)}


def _dependents(stage: str, depends: dict = DEPENDS) -> list[str]:
    """Every stage that reads ``stage``'s files, directly or through another."""
    out: list[str] = []
    todo = [stage]
    while todo:
        s = todo.pop()
        for t, deps in depends.items():
            if s in deps and t not in out:
                out.append(t)
                todo.append(t)
    return out


class Manifest:
    """``manifest.json``: per stage its input key, seconds and files; per artifact its
    SHA-256, the stage that made it and the command line.

    It lists exactly the artifacts in the folder: a stage that reruns removes the files
    of the stages that depend on it (`DEPENDS`) and its own files that it no longer
    writes, and `finish` removes what the stages of this run did not make or reuse (a
    ``check.json`` of an earlier run with a limits file, say). Files that mixrank never
    recorded are left alone. A manifest that is not one (malformed JSON, the wrong
    shape) is ignored, and every stage reruns."""

    def __init__(self, out: Path, force: bool, depends: dict = DEPENDS):
        self.out, self.depends = out, depends
        self.path = out / "manifest.json"
        self.force = force
        self.data = {"stages": {}, "artifacts": {}}
        if self.path.is_file():
            try:
                data = loads_json(self.path.read_text(), str(self.path))
            except (json.JSONDecodeError, UnicodeDecodeError, MixrankError, OSError):
                data = None
            if _well_formed(data):
                self.data = data
        if force:  # forget the keys, keep the list of what is ours (to remove what this run no longer makes)
            self.data["stages"] = {k: {"files": v.get("files", [])} for k, v in self.data["stages"].items()}
        self.command = " ".join(["mixrank", *sys.argv[1:]]) if sys.argv else "mixrank"
        self.seen: set[str] = set()

    def fresh(self, stage: str, key: str, files: list[str]) -> bool:
        st = self.data["stages"].get(stage)
        if self.force or not st or st.get("key") != key:
            return False
        for f in st.get("files", files):
            p = self.out / f
            art = self.data["artifacts"].get(f)
            if not p.is_file() or not art or art["sha256"] != sha256_file(p):
                return False
        return True

    def _drop(self, stage: str, keep: tuple[str, ...] = ()) -> None:
        """Remove ``stage``'s recorded files (but ``keep``) and its record."""
        st = self.data["stages"].pop(stage, None) or {}
        for f in st.get("files", []):
            if f not in keep and self.data["artifacts"].get(f, {}).get("stage") == stage:
                (self.out / f).unlink(missing_ok=True)
                self.data["artifacts"].pop(f, None)

    def record(self, stage: str, key: str, files: list[str], seconds: float, extra=None) -> None:
        self.data["stages"][stage] = {"key": key, "seconds": round(seconds, 3), "files": list(files),
                                      **(extra or {})}
        for f in files:
            self.data["artifacts"][f] = {"sha256": sha256_file(self.out / f), "stage": stage,
                                         "bytes": (self.out / f).stat().st_size,
                                         "command": self.command}
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.path, json_text(self.data))

    def stage(self, name: str, key: str, files: list[str], fn: Callable[[], dict | None],
              log: Callable[[str], None]) -> tuple[dict, bool]:
        """Run ``fn`` unless the stage is fresh; returns (stage record, reused). ``fn`` may
        return ``{"files": [...]}``: files it wrote beyond ``files`` (plots, say)."""
        self.seen.add(name)
        if self.fresh(name, key, files):
            log(f"[{name}] up to date, reused")
            return self.data["stages"][name], True
        log(f"[{name}] running")
        changed = False
        for dep in _dependents(name, self.depends):  # their files are stale the moment this stage reruns
            changed |= dep in self.data["stages"]
            self._drop(dep)
        if changed:
            self._save()
        t0 = time.perf_counter()
        extra = dict(fn() or {})
        written = list(dict.fromkeys([*files, *extra.pop("files", [])]))
        written += [f + side for f in written if f.endswith(".onnx") for side in (".data", ".json")
                    if (self.out / (f + side)).is_file()]  # external data; an optimized graph's build record
        self._drop(name, keep=tuple(written))  # what it wrote last time and not now
        self.record(name, key, written, time.perf_counter() - t0, extra)
        return self.data["stages"][name], False

    def finish(self) -> None:
        """Remove the files and records of the stages this run did not run or reuse."""
        stale = [s for s in self.data["stages"] if s not in self.seen]
        for s in stale:
            self._drop(s)
        for f in [f for f, a in self.data["artifacts"].items() if a.get("stage") not in self.data["stages"]]:
            (self.out / f).unlink(missing_ok=True)
            self.data["artifacts"].pop(f)
        if stale:
            self._save()


def _well_formed(data) -> bool:
    """Whether ``data`` has a manifest's shape: stages and artifacts, each a dict of dicts,
    files as lists of plain names and digests as strings."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) \
            or not isinstance(data.get("artifacts"), dict):
        return False
    for st in data["stages"].values():
        if not isinstance(st, dict) or not isinstance(st.get("files", []), list) \
                or not all(_plain_name(f) for f in st.get("files", [])):
            return False
    return all(_plain_name(f) and isinstance(a, dict) and isinstance(a.get("sha256"), str)
               for f, a in data["artifacts"].items())


def _plain_name(f) -> bool:
    """A file name inside the folder (no path: a forged manifest must not make mixrank
    remove a file elsewhere)."""
    return (isinstance(f, str) and f not in ("", ".", "..", "manifest.json", ".mixrank.lock")
            and not any(c in f for c in "/\\\0"))


@dataclass(frozen=True)
class RunOptions:
    """What the main job runs on, besides the compression's configuration.

    Attributes:
        model, pretrained, checkpoint: the model (`ModelSource`; ``None``: the built-in
            digits ViT).
        images, calib_images, max_image_pixels: the calibration images (a folder; how
            many; the decoded-size cap, ``None``: the default).
        eval_images, eval_csv: labelled evaluation data (``None``: the model's own test
            split, else the calibration images, marked as not held out).
        out: the output folder; force: redo every stage.
        batch_sizes, seconds: the batch sizes timed, and the timing limit per batch size.
        limits, junit: the CI limits file to check (``None``: no check) and where to
            write the check as JUnit XML.
        progress: progress bars and stage lines.
        target: where artifacts are built, timed and gated (`Target`).
        texts, eval_texts, max_length: a text model's calibration and evaluation texts
            (``None``: the shipped ones) and tokens per text; calib_images is then the
            number of calibration texts.
        seq_len: the tokens per input a text model is timed at.
        like: the sibling whose size is the budget (`CompressArgs.like`'s record), for
            the plan and the report.
        int_weights: how onnxruntime holds the integer weights: ``"auto"`` (the faster of
            the two forms, timed on the target at ``batch_sizes``), ``"packed"``
            (``MatMulNBits``), ``"expanded"`` or ``"dynamic"`` (`mixrank.exporter.INT_WEIGHTS`).
        latency: a latency budget besides the bytes (``"0.5x"`` of the original's time, or
            ``"12ms"``; ``None``: none), at ``latency_batch`` (``None``: the largest of
            ``batch_sizes``), predicted from a table measured on the target (``latency.json``).
    """

    model: str | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    images: str | None = None
    calib_images: int = 512
    max_image_pixels: int | None = None
    eval_images: str | None = None
    eval_csv: str | None = None
    out: str = "mixrank-out"
    batch_sizes: tuple[int, ...] = (1, 32)
    seconds: float = 20.0
    limits: str | None = None
    junit: str | None = None
    force: bool = False
    progress: bool = True
    target: Target = Target()
    texts: str | None = None
    eval_texts: str | None = None
    max_length: int = MAX_LENGTH
    seq_len: int = SEQ_LEN
    like: dict | None = None
    int_weights: str = "auto"
    latency: str | None = None
    latency_batch: int | None = None

    def check(self) -> None:
        """Refuse what cannot run, before any work.

        Raises:
            MixrankError: a latency budget on TensorRT, with packed integer weights (whose
                time the table does not measure), or a bad value or batch.
        """
        if self.latency is None:
            return
        from mixrank.compress import parse_latency

        parse_latency(self.latency)
        if self.target.engine != "onnxruntime" or self.target.provider == "tensorrt":
            raise MixrankError("--latency measures its table on onnxruntime (cpu or cuda); TensorRT would build an "
                               "engine per timed product")
        if self.int_weights == "packed":
            raise MixrankError("--latency predicts float32 (expanded) or dynamic int8 compute; --int-weights packed "
                               "runs MatMulNBits, which its table does not time: give --int-weights expanded or "
                               "dynamic (auto means expanded under --latency)")
        if self.latency_batch is not None and self.latency_batch < 1:
            raise MixrankError(f"--latency-batch must be a positive batch size, got {self.latency_batch}")

    @property
    def budget_batch(self) -> int:
        """The batch size the latency budget is at."""
        return self.latency_batch or max(self.batch_sizes)

    @property
    def weights(self) -> str:
        """The integer weights' form asked for (under a latency budget auto is expanded: the
        form whose time the table holds)."""
        return "expanded" if self.latency is not None and self.int_weights == "auto" else self.int_weights


def run_pipeline(options: RunOptions, cfg: CompressConfig, log: Callable[[str], None]) -> dict:
    """The main job: model → calibration → compress → export → rewrite → engines →
    measure → report → check. Returns the summary.

    The output folder is locked for the whole run (one writer per folder); a run that
    fails before its first stage leaves no folder it created behind.
    """
    options.check()
    if options.junit:
        check_writable_path(options.junit)
    with output_folder(options.out, " ".join(["mixrank", *sys.argv[1:]])) as out:
        return _Run(options, cfg, log, out).all()


class _Run:
    """The main job in one folder: each stage's inputs, key and files (`Manifest.stage`)."""

    def __init__(self, options: RunOptions, cfg: CompressConfig, log: Callable[[str], None], out: Path):
        self.o, self.cfg, self.log, self.out = options, cfg, log, out
        self.man = Manifest(out, options.force, DEPENDS if options.latency is None else LATENCY_DEPENDS)
        self.target = options.target
        self.comp_onnx = "compressed.onnx" if self.target.rewrite_target == "onnxruntime" else \
            "compressed.tensorrt.onnx"

    def all(self) -> dict:
        o = self.o
        limits = load_limits(o.limits) if o.limits else None  # a bad limits file fails first
        torch.manual_seed(self.cfg.seed)
        check_texts(o.texts, o.eval_texts)  # a bad text file fails before the model loads
        src = ModelSource(o.model, o.pretrained, o.checkpoint, o.progress, o.max_image_pixels, warn,
                          max_length=o.max_length)
        self.src, self.cfg = src, src.configure(self.cfg)
        self.model, self.mfp = src.model, model_fingerprint(src.model)
        self.calib = src.calibration(o.images, o.calib_images, self.cfg.seed, texts=o.texts)
        self.ev = held_out_texts(src.evaluation(o.eval_images, o.eval_csv, fallback=self.calib, texts=o.eval_texts),
                                 self.calib, warn)
        self.source = src.source(self.calib, o.like)
        if o.latency is not None:  # the original is timed before the compression that must beat it
            self.export()
            factors = self.compress(self.latency_budget())
        else:
            factors = self.compress()
            self.export()
        k_rw = self.rewrite(factors)
        graphs = self.reference_graphs()
        settings = self.target.settings(o.batch_sizes, o.seq_len, o.max_length)
        built = {tag: self.target.artifact(tag) for tag in graphs}
        k_build = self.build(graphs, built, settings, k_rw)
        rep = self.bench(graphs, built, settings, factors, k_build)
        return self.summary(rep, factors, limits)

    def latency_budget(self) -> LatencyBudget:
        """The latency table of the selected layers on the target (``latency.json``), and
        the budget ``--latency`` asks for against it."""
        o, out, src = self.o, self.out, self.src
        compute = self.cfg.quantize.compute
        computes = ("float", "dynamic") if compute == "dynamic" else ("float",)
        settings = self.target.settings(o.batch_sizes, o.seq_len, o.max_length)

        def do():
            tokens = o.seq_len if src.kind == "text" else None
            layers = latency_layers(self.model, self.cfg, self.ev.head(1), tokens)
            table = latency_table(out / "original.onnx", layers, o.budget_batch, settings, engine=self.target.engine,
                                  computes=computes, seq_len=o.seq_len, progress=o.progress)
            atomic_write_text(out / "latency.json", json_text(table))

        sel = self.cfg.selection
        key = _key(sha256_file(out / "original.onnx"), o.budget_batch, computes, settings.to_dict(),
                   self.target.describe(), sel.include, sel.exclude, o.seq_len)
        self.man.stage("latency", key, ["latency.json"], do, self.log)
        table = LatencyTable.from_dict(loads_json((out / "latency.json").read_text(), "latency.json"), "latency.json")
        budget = LatencyBudget.of(table, o.latency, compute)
        self.log(f"[latency] budget {budget.limit_ms:.2f} ms at batch {table.batch} (the original: "
                 f"{table.original_ms:.2f} ms, {budget.rest_ms:.2f} ms of it outside the selected layers)")
        return budget

    def compress(self, latency: LatencyBudget | None = None):
        def do():
            f = compress_model(self.model, self.calib.batches, self.cfg, source=self.source, progress=self.o.progress,
                               latency=latency)
            save_factors(f, self.out / "model.mixrank.safetensors")
            return {"summary": f.summary()}

        key = _key(self.mfp, self.calib.key, self.cfg.to_dict(),
                   *(() if latency is None else (latency.asked, latency.table.sha256)))
        self.man.stage("compress", key, ["model.mixrank.safetensors"], do, self.log)
        return load_factors(self.out / "model.mixrank.safetensors")

    def export(self) -> None:
        ev, src = self.ev, self.src

        def do():
            export_onnx(self.model, ev.head(2), self.out / "original.onnx", check_inputs=ev.head(16),
                        input_name=src.input_names[0], output_name=src.output_name)

        shape = [] if src.kind == "text" else list(ev.x.shape[1:])
        key = _key(self.mfp, shape, 17, src.input_names, src.output_name)
        self.man.stage("export", key, ["original.onnx"], do, self.log)

        refs = self.target.references

        def do_reference():  # what a user gets without mixrank: onnxruntime's own quantizers
            for name in refs:
                write_reference(name, self.out / "original.onnx", self.out / f"original.{name}.onnx")

        if refs:
            self.man.stage("reference", _key(sha256_file(self.out / "original.onnx"), refs, 32),
                           [f"original.{name}.onnx" for name in refs], do_reference, self.log)

    def rewrite(self, factors) -> str:
        out, comp_onnx = self.out, self.comp_onnx

        def do():
            settings = self.target.settings(self.o.batch_sizes, self.o.seq_len, self.o.max_length)
            rep, choice = rewrite_fastest(out / "original.onnx", factors, out / comp_onnx, self.o.weights,
                                          self.o.batch_sizes, settings, seq_len=self.o.seq_len,
                                          target=self.target.rewrite_target)
            if choice:
                self.log(f"[rewrite] integer weights {choice['chosen']} (timed: " + "; ".join(
                    f"{w} " + ", ".join(f"b{b} {ms:.2f} ms" for b, ms in t.items())
                    for w, t in choice["p50_ms"].items()) + ")")
            atomic_write_text(out / "rewrite.json", json_text({**rep.to_dict(), "weights_choice": choice}))
            # the dynamic form quantizes activations: the PyTorch side simulates it (agreeing to float rounding)
            v = verify_rewrite(out / comp_onnx, self.model, factors, self.ev.head(64),
                               int_weights="dynamic" if rep.weights == "dynamic" else "exact")
            return {"verify": v["outputs"]}

        key = _key(sha256_file(out / "original.onnx"), sha256_file(out / "model.mixrank.safetensors"),
                   self.target.rewrite_target, self.o.weights,
                   self.o.batch_sizes if self.o.weights == "auto" else None)
        self.man.stage("rewrite", key, [comp_onnx, "rewrite.json"], do, self.log)
        return key

    def reference_graphs(self) -> dict[str, str]:
        graphs = {"original": "original.onnx", "compressed": self.comp_onnx}
        graphs.update({f"original.{name}": f"original.{name}.onnx" for name in self.target.references})
        if not self.target.references and self.target.rewrite_target == "tensorrt":
            self.log(f"no int8 reference on {self.target.label()}: onnxruntime's quantizers write MatMulNBits and "
                     "MatMulInteger, which TensorRT cannot run")
        return graphs

    def build(self, graphs: dict, built: dict, settings, k_rw: str) -> str:
        def do():
            calib_x = [b.numpy() for b in self.calib.batches] \
                if self.target.engine == "tensorrt" and self.src.kind == "image" else None
            for tag, onnx_file in graphs.items():
                self.target.build(self.out / onnx_file, self.out / built[tag], settings, calib_x)

        key = _key(k_rw, *(sha256_file(self.out / g) for g in graphs.values()), settings.to_dict(),
                   self.target.describe())
        self.man.stage("build", key, list(built.values()), do, self.log)
        return key

    def bench(self, graphs: dict, built: dict, settings, factors, k_build: str) -> dict:
        out, ev, o = self.out, self.ev, self.o

        src = self.src

        def do():
            refs = {name: (out / built[f"original.{name}"], out / graphs[f"original.{name}"])
                    for name in self.target.references} or None
            inputs = ev.feeds(src.input_names) if src.kind == "text" else ev.x.numpy()
            res = measure(out / built["original"], out / built["compressed"], o.batch_sizes, settings,
                          inputs, None if ev.labels is None else ev.labels.numpy(),
                          TimingConfig(max_seconds=o.seconds), progress=o.progress, engine=self.target.engine,
                          graphs=(out / graphs["original"], out / graphs["compressed"]), references=refs,
                          seq_len=o.seq_len, output="embedding" if src.output_name == "embedding" else "logits")
            res.target = self.target.describe()
            for tag in res.footprint:
                name = tag if tag in ("original", "compressed") else f"original.{tag}"
                res.footprint[tag]["engine_bytes"] = (out / built[name]).stat().st_size
            res.evaluation = {"source": ev.source, "held_out": ev.held_out, "samples": ev.count, **ev.record,
                              "note": ev.note}
            rep = build_report(res, factors.plan, json.loads((out / "rewrite.json").read_text()))
            rep["summary"]["engine_bytes"] = res.footprint["compressed"]["engine_bytes"]
            return {"files": [p.name for p in write_report(rep, out).values()]}

        key = _key(k_build, o.batch_sizes, o.seconds, self.calib.key, ev.key, o.seq_len)
        self.man.stage("bench", key, ["report.json", "report.md"], do, self.log)
        return json.loads((out / "report.json").read_text())

    def summary(self, rep: dict, factors, limits) -> dict:
        budget = factors.plan.budget
        used: dict[str, int] = {}
        for i in factors.layers.values():
            used[i.precision] = used.get(i.precision, 0) + 1
        m = rep["measurement"]
        summary = {"out": str(self.out), "model": self.source["model"], "method": self.cfg.method,
                   "keep": budget.keep, "target": m.get("target", {"engine": m["engine"]}),
                   "budget": {"keep": budget.keep, "params": budget.params, "bytes": budget.bytes,
                              "precision": budget.precision, "precisions": used},
                   **rep["summary"], "footprint": m["footprint"], "evaluation": m.get("evaluation", {}),
                   "calibration": {"source": self.calib.source, **self.calib.record}, "kind": self.src.kind,
                   "output": self.src.output_name, "seq_len": m.get("seq_len"), "like": self.o.like,
                   "notes": [n for n in (self.calib.note, self.ev.note) if n],
                   "throughput": [{k: v for k, v in t.items() if k != "sessions"} |
                                  {"p50_ms": {n: s["p50_ms"] for n, s in t["sessions"].items()}}
                                  for t in m["throughput"]],
                   "manifest": str(self.man.path), "latency": rep.get("latency")}
        if limits:
            verdict = check_report(rep, limits)
            summary["check"] = verdict

            def do():
                atomic_write_text(self.out / "check.json", json_text(verdict))

            self.man.stage("check", _key(sha256_file(self.out / "report.json"), limits), ["check.json"], do,
                           lambda msg: None)  # the check is cheap, and rerun so that its verdict is printed
            if self.o.junit:
                atomic_write_text(Path(self.o.junit), junit_xml(verdict))
        self.man.finish()  # no file of an earlier run stays beside this one's (check.json without --limits)
        return summary

