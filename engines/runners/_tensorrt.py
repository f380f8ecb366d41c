"""TensorRT engines through TensorRT's Python API (TensorRT 10 and 11).

Kept thin on purpose: it cannot run where ``tensorrt`` is not installed, and its
tests carry the ``tensorrt`` marker. ``import mixrank.engines`` does not import
tensorrt: the package is imported when an engine is built or loaded.

- TensorRT 10 (JetPack 6 on Orin, x86): precision from builder flags
  (``BuilderFlag.FP16``; ``BuilderFlag.INT8`` with an entropy calibrator fed from the
  calibration images).
- TensorRT 11: strongly typed networks; precision comes from the ONNX file (export it
  with ``export_onnx(..., fp16=True)``), no precision flags.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixrank.core import atomic_write_bytes

from .._errors import MixrankError, NotInstalledError
from ._base import Runner, TensorSpec

PRECISIONS = ("fp32", "fp16", "int8")


def import_tensorrt():
    """The ``tensorrt`` module.

    Raises:
        NotInstalledError: it is not installed (names the extra and the container).
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise NotInstalledError(
            "the TensorRT engine needs the 'tensorrt' Python package (pip install 'mixrank[tensorrt]', "
            "or use NVIDIA's TensorRT container / JetPack); onnxruntime engines need nothing more"
        ) from None
    return trt


@dataclass
class TrtSettings:
    precision: str = "fp16"  # TensorRT 10: builder flag; TensorRT 11: must match the ONNX file
    workspace_mb: int = 2048
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    timing_cache: str | None = None
    opt_seq: int = 128  # a text model's dynamic sequence axis: optimised for opt_seq, 1 to max_seq tokens
    max_seq: int = 512

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise MixrankError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise MixrankError("batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch")
        if not 1 <= self.opt_seq <= self.max_seq:
            raise MixrankError("sequence lengths must satisfy 1 <= opt_seq <= max_seq")

    def to_dict(self) -> dict:
        """The settings as a dict (the report's, and the peak-memory probe's arguments)."""
        return asdict(self)


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _int8_calibrator(trt, batches: list[np.ndarray], cache_path: Path):
    """An entropy calibrator (TensorRT 10) feeding calibration images from the GPU."""
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = iter(batches)
            self.dev = None

        def get_batch_size(self):
            return int(batches[0].shape[0])

        def get_batch(self, names):
            try:
                x = next(self.batches)
            except StopIteration:
                return None
            self.dev = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
            return [int(self.dev.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            atomic_write_bytes(cache_path, bytes(cache))

    return Calibrator()


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 settings: TrtSettings | None = None,
                 calibration: list[np.ndarray] | None = None) -> dict:
    """Build and serialize a TensorRT engine from ``onnx_path``; writes ``engine_path``
    atomically and a sidecar ``<engine>.json`` with the build settings and versions. A
    failed build leaves no engine file.

    Args:
        onnx_path, engine_path: the ONNX file and the engine to write.
        settings: the `TrtSettings` (``None``: fp16, batch 1 to 32).
        calibration: images for TensorRT 10's INT8 entropy calibrator (precision int8).

    Returns:
        The sidecar dict (settings, versions, engine bytes, device memory, layers).
    """
    trt = import_tensorrt()
    s = settings or TrtSettings()
    engine_path = Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = _major(trt)
    flags = 0
    if major >= 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MixrankError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if major < 11:
        if s.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if s.precision == "int8":
            if not calibration:
                raise MixrankError("INT8 needs calibration images")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _int8_calibrator(
                trt, calibration, engine_path.with_suffix(".int8cache"))
    elif s.precision == "int8":
        raise MixrankError("TensorRT 11 takes INT8 from a quantized (Q/DQ) ONNX file, not a "
                           "calibrator; use precision fp16 or fp32 (the ONNX file's own types)")
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if dims and -1 in dims:  # the batch first; any other dynamic axis is a text model's sequence
            lo, opt, hi = ([b if j == 0 else (q if d == -1 else d) for j, d in enumerate(dims)]
                           for b, q in ((s.min_batch, 1), (s.opt_batch, s.opt_seq), (s.max_batch, s.max_seq)))
            profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(s.timing_cache) if s.timing_cache else engine_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MixrankError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    build_s = time.perf_counter() - t0
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(
        trt.LayerInformationFormat.JSON))
    dev_mem = getattr(engine, "device_memory_size_v2", None)
    if dev_mem is None:
        dev_mem = engine.device_memory_size
    atomic_write_bytes(engine_path, bytes(serialized))
    sidecar = {"settings": asdict(s), "tensorrt": trt.__version__, "strongly_typed": major >= 11,
               "onnx": str(onnx_path), "engine_bytes": engine_path.stat().st_size,
               "device_memory_bytes": int(dev_mem), "build_seconds": build_s,
               "machine": platform.node(), "layers": info.get("Layers", [])}
    atomic_write_bytes(engine_path.with_name(engine_path.name + ".json"),
                  json.dumps(sidecar, indent=1, default=str).encode())
    return sidecar


def _torch_dtype(trt, dt):
    import torch

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
            trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}[dt]


class TrtRunner(Runner):
    """A serialized TensorRT engine as a `Runner`.

    I/O tensors are found by name (``num_io_tensors``, ``get_tensor_name``,
    ``get_tensor_mode``); inputs are shaped per call with ``set_input_shape``; every
    buffer is a torch CUDA tensor whose address is bound with ``set_tensor_address``;
    inference is ``execute_async_v3`` on a torch CUDA stream, timed with CUDA events.
    """

    engine = "tensorrt"
    settings_type = TrtSettings

    def load(self) -> TrtRunner:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise MixrankError("the TensorRT engine needs an NVIDIA GPU, and torch sees none")
        self.settings = self.settings or TrtSettings()
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine_obj = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine_obj is None:
            raise MixrankError(f"TensorRT cannot deserialize {self.path} (built by another TensorRT "
                               "version or for another GPU?)")
        self.context = self.engine_obj.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine_obj.get_tensor_name(i) for i in range(self.engine_obj.num_io_tensors)]
        self.input_names = [n for n in names if self.engine_obj.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        return self

    def inputs(self) -> list[TensorSpec]:
        e, trt = self.engine_obj, self.trt
        return [TensorSpec(n, tuple(None if d < 0 else int(d) for d in e.get_tensor_shape(n)),
                           np.dtype(trt.nptype(e.get_tensor_dtype(n))).type) for n in self.input_names]

    def _bind(self, feeds: dict[str, np.ndarray]) -> list:
        torch, e = self.torch, self.engine_obj
        self._keep = []
        for n in self.input_names:
            x = torch.from_numpy(np.ascontiguousarray(feeds[n])).cuda()
            self.context.set_input_shape(n, tuple(x.shape))
            self.context.set_tensor_address(n, x.data_ptr())
            self._keep.append(x)
        outs = []
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            y = torch.empty(shape, dtype=_torch_dtype(self.trt, e.get_tensor_dtype(n)), device="cuda")
            self.context.set_tensor_address(n, y.data_ptr())
            outs.append(y)
        return outs

    def _run(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise MixrankError(f"TensorRT failed to run {self.path}")

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self._bind(feeds)
        self._run()
        self.stream.synchronize()
        return [y.float().cpu().numpy() for y in outs]

    def synchronize(self) -> None:
        self.stream.synchronize()

    def time(self, feeds: dict[str, np.ndarray], iters: int) -> list[float]:
        """Per-run seconds from CUDA events around ``execute_async_v3`` (inputs bound once,
        host transfers excluded)."""
        torch = self.torch
        self._bind(feeds)
        out = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._run()
            end.record(self.stream)
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return out

    def memory(self) -> dict:
        e = self.engine_obj
        dev = getattr(e, "device_memory_size_v2", None)
        return {"device_memory_bytes": int(dev if dev is not None else e.device_memory_size),
                "engine_bytes": self.path.stat().st_size}

    def describe(self) -> dict:
        return {"engine": self.engine, "tensorrt": self.trt.__version__,
                "device": self.torch.cuda.get_device_name(), **self.settings.to_dict()}

    def close(self) -> None:
        self.context = self.engine_obj = self.runtime = None


def check_two_gemms(sidecar: dict, rewritten: list[dict]) -> list[dict]:
    """From the engine inspector's layer list (``sidecar``, `build_engine`'s record),
    confirm that each ``rewritten`` layer (the rewrite report's) still
    runs as two GEMMs (its ``matmul_b`` and ``matmul_a`` nodes are not one layer whose
    weights are the dense product). Returns one finding per rewritten layer."""
    layers = sidecar.get("layers", [])
    texts = [json.dumps(layer) if not isinstance(layer, str) else layer for layer in layers]
    findings = []
    for r in rewritten:
        base = f"{r['node']}/mixrank"
        b = [t for t in texts if base in t and "matmul_b" in t]
        a = [t for t in texts if base in t and "matmul_a" in t]
        if not a or not b:
            status = "not found in the inspector output"
        elif any(t in a for t in b):
            status = "fused into one engine layer (inner size not visible; check the profile)"
        else:
            status = "two GEMMs"
        findings.append({"layer": r["layer"], "node": r["node"], "rank": r["rank"], "status": status})
    return findings
