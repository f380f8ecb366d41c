"""onnxruntime: sessions with explicit, recorded settings, the onnxruntime `Runner`, and
the onnxruntime "engine build" (the graph onnxruntime optimises, saved)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mixrank.core import atomic_write, atomic_write_text, import_onnxruntime

from .._errors import MixrankError, NotInstalledError
from ._base import RUNNERS, Runner, TensorSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def optimization_level(name: str):
    """onnxruntime's ``GraphOptimizationLevel`` for ``"disable"``/``"basic"``/``"extended"``/``"all"``."""
    ort = import_onnxruntime()

    return {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[name]


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
        spinning: let idle intra-op threads spin (onnxruntime's default) instead of
            sleeping. Off by default: the artifacts of a measurement run interleaved, each in
            its own session, and one session's spinning threads take the cores the next one
            runs on (measured on 2 cores: the digits original at batch 32, 13.0 ms with
            spinning against 8.5 ms without).
    """

    provider: str = "cpu"
    threads: int = 0
    optimization: str = "all"
    trt_fp16: bool = True
    cache_dir: str | None = None
    spinning: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise MixrankError(f"unknown onnxruntime provider {self.provider!r}; choose one of "
                               f"{', '.join(PROVIDERS)}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise MixrankError(f"unknown optimization level {self.optimization!r}")
        if not isinstance(self.spinning, bool):
            raise MixrankError(f"spinning must be true or false, got {self.spinning!r}")
        if self.threads < 0:
            raise MixrankError(f"threads must be >= 0, got {self.threads}")

    def to_dict(self) -> dict:
        """The settings as a dict (the report's, and the peak-memory probe's arguments)."""
        return asdict(self)


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _numpy_type(ort_type: str) -> type:
    """The numpy type of an onnxruntime input type such as ``tensor(int64)``.

    Raises:
        MixrankError: a type mixrank does not feed.
    """
    if ort_type not in ORT_TYPES:
        raise MixrankError(f"an input of type {ort_type} is not supported; mixrank feeds {', '.join(ORT_TYPES)}")
    return ORT_TYPES[ort_type]


def available_providers() -> list[str]:
    """The execution providers of the installed onnxruntime build."""
    ort = import_onnxruntime()

    return list(ort.get_available_providers())


def ort_session(onnx_path: str | os.PathLike, settings: OrtSettings | None = None,
                optimized_model: str | os.PathLike | None = None, profile: str | None = None):
    """An ``onnxruntime.InferenceSession`` for ``onnx_path`` with ``settings``
    (``optimized_model``: also save the graph onnxruntime optimised there; ``profile``: record
    each node's time, in a file of that prefix, which ``end_profiling()`` names).

    Raises:
        NotInstalledError: the provider is not in this onnxruntime build (names the
            package that has it).
        MixrankError: the model cannot be loaded.
    """
    ort = import_onnxruntime()

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
    so.graph_optimization_level = optimization_level(s.optimization)
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if s.spinning else "0")
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile
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


@RUNNERS.register("onnxruntime")
class OrtRunner(Runner):
    """An onnxruntime session as a `Runner` (settings: `OrtSettings`)."""

    engine = "onnxruntime"
    settings_type = OrtSettings

    def load(self) -> OrtRunner:
        self.settings = self.settings or OrtSettings()
        self.session = ort_session(self.path, self.settings)
        return self

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), _numpy_type(i.type))
                for i in self.session.get_inputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def describe(self) -> dict:
        ort = import_onnxruntime()

        return {"engine": self.engine, "onnxruntime": ort.__version__, **self.settings.to_dict()}

    def close(self) -> None:
        self.session = None


def build_ort(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
              settings: OrtSettings | None = None) -> dict:
    """"Build" an onnxruntime engine: load the model ``onnx_path`` with ``settings`` and save
    at ``out_path`` the graph onnxruntime optimised (``SessionOptions.optimized_model_filepath``), written
    atomically; a model that fails to load leaves no file. Returns the build record."""
    ort = import_onnxruntime()

    s = settings or OrtSettings()
    out = Path(out_path)
    secs = [0.0]

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        ort_session(onnx_path, s, optimized_model=tmp)
        secs[0] = time.perf_counter() - t0
        if not tmp.is_file():
            raise MixrankError(f"onnxruntime wrote no optimized model for {onnx_path}")

    atomic_write(out, write)  # external data of a large optimized model moves along
    record = {"engine": "onnxruntime", "onnxruntime": ort.__version__, "settings": s.to_dict(),
              "onnx": str(onnx_path), "engine_path": str(out), "engine_bytes": out.stat().st_size,
              "build_seconds": secs[0]}
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=1))
    return record
