"""onnxruntime "engines": a session with explicit, recorded settings."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._errors import MixrankError, NotInstalledError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class OrtSettings:
    """Session settings, all recorded in the report.

    Attributes:
        provider: ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (onnxruntime execution
            providers; the last two need an onnxruntime build that has them).
        threads: intra-op threads (0: onnxruntime's default, all cores).
        optimization: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        trt_fp16: TensorRT EP: build fp16 engines.
        cache_dir: TensorRT EP: engine cache folder.
    """

    provider: str = "cpu"
    threads: int = 0
    optimization: str = "all"
    trt_fp16: bool = True
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise MixrankError(f"unknown onnxruntime provider {self.provider!r}; choose one of "
                               f"{', '.join(PROVIDERS)}")
        if self.optimization not in ("disable", "basic", "extended", "all"):
            raise MixrankError(f"unknown optimization level {self.optimization!r}")
        if self.threads < 0:
            raise MixrankError(f"threads must be >= 0, got {self.threads}")

    def to_dict(self) -> dict:
        return asdict(self)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_session(onnx_path: str | os.PathLike, settings: OrtSettings | None = None,
                optimized_model: str | os.PathLike | None = None):
    """An ``onnxruntime.InferenceSession`` for ``onnx_path`` with ``settings``
    (``optimized_model``: also save the graph onnxruntime optimised there).

    Raises:
        NotInstalledError: the provider is not in this onnxruntime build (names the
            package that has it).
        MixrankError: the model cannot be loaded.
    """
    import onnxruntime as ort

    s = settings or OrtSettings()
    want = PROVIDERS[s.provider]
    if want not in ort.get_available_providers():
        pkg = {"cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu (built with TensorRT) and "
               "tensorrt"}[s.provider]
        raise NotInstalledError(
            f"onnxruntime provider {want} is not available in this onnxruntime "
            f"({ort.__version__}, providers: {', '.join(ort.get_available_providers())}); "
            f"install {pkg}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = s.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[s.optimization]
    so.log_severity_level = 3
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    providers: list = [want]
    if s.provider == "tensorrt":
        cache = s.cache_dir or str(Path(onnx_path).parent / "trt_cache")
        providers = [(want, {"trt_fp16_enable": s.trt_fp16, "trt_engine_cache_enable": True,
                             "trt_engine_cache_path": cache}), "CUDAExecutionProvider"]
    if s.provider != "cpu":
        providers.append("CPUExecutionProvider")
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=providers)
    except Exception as e:
        raise MixrankError(f"onnxruntime cannot load {onnx_path}: {e}") from None


def build_ort(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
              settings: OrtSettings | None = None) -> dict:
    """"Build" an onnxruntime engine: load the model with ``settings`` and save the
    graph onnxruntime optimised (``SessionOptions.optimized_model_filepath``), written
    atomically; a model that fails to load leaves no file. Returns the build record."""
    import json
    import tempfile
    import time

    import onnxruntime as ort

    s = settings or OrtSettings()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmpdir / out.name
        t0 = time.perf_counter()
        ort_session(onnx_path, s, optimized_model=tmp)
        secs = time.perf_counter() - t0
        if not tmp.is_file():
            raise MixrankError(f"onnxruntime wrote no optimized model for {onnx_path}")
        os.replace(tmp, out)
        for extra in tmpdir.iterdir():  # external data of a large optimized model
            os.replace(extra, out.parent / extra.name)
    finally:
        for p in tmpdir.glob("*"):
            p.unlink()
        tmpdir.rmdir()
    record = {"engine": "onnxruntime", "onnxruntime": ort.__version__, "settings": s.to_dict(),
              "onnx": str(onnx_path), "engine_path": str(out), "engine_bytes": out.stat().st_size,
              "build_seconds": secs}
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=1))
    return record
