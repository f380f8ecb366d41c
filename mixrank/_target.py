"""Where the main job builds, times and gates its artifacts: an engine, an execution
provider (onnxruntime) and a precision (TensorRT). Everything a target needs is checked
before any work, so a machine without the engine fails in a second with one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixrank.core import MixrankError

ENGINES = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Target:
    """``engine`` onnxruntime (``provider`` cpu, cuda or tensorrt) or tensorrt
    (``precision`` fp32, fp16 or int8 builder flags on TensorRT 10)."""

    engine: str = "onnxruntime"
    provider: str = "cpu"
    precision: str = "fp16"
    threads: int = 0

    @classmethod
    def from_args(cls, engine: str | None, provider: str | None, precision: str | None, threads: int = 0) -> Target:
        """The target of ``--engine``, ``--provider``, ``--engine-precision``.

        Raises:
            MixrankError: a combination that means nothing (one line saying why).
        """
        engine = engine or "onnxruntime"
        if engine not in ENGINES:
            raise MixrankError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "tensorrt":
            if provider not in (None, "tensorrt"):
                raise MixrankError("--provider chooses onnxruntime's execution provider; leave it out with "
                                   "--engine tensorrt (TensorRT is its own runtime)")
            return cls("tensorrt", "tensorrt", precision or "fp16", threads)
        provider = provider or "cpu"
        if precision is not None and provider != "tensorrt":
            raise MixrankError("--engine-precision sets TensorRT's precision: give --engine tensorrt or "
                               "--provider tensorrt (the factors' own precision is --precision)")
        if precision == "int8":
            raise MixrankError("onnxruntime's TensorRT provider builds fp32 or fp16 here; int8 engines: "
                               "--engine tensorrt --engine-precision int8")
        return cls("onnxruntime", provider, precision or "fp16", threads)

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Fail now, with one line naming what to install, when this machine cannot run the
        target.

        Raises:
            MixrankError: the engine's package or the GPU is missing.
        """
        if self.engine == "tensorrt":
            from mixrank.engines import import_tensorrt

            import_tensorrt()
            import torch

            if not torch.cuda.is_available():
                raise MixrankError("--engine tensorrt needs an NVIDIA GPU, and torch sees none")
            return
        from mixrank.engines import PROVIDERS, available_providers

        have = available_providers()
        if PROVIDERS[self.provider] not in have:
            raise MixrankError(
                f"this onnxruntime build has no {PROVIDERS[self.provider]} (it has {', '.join(have)}); "
                "the CUDA and TensorRT providers come with onnxruntime-gpu: pip uninstall -y onnxruntime, then "
                "pip install 'mixrank[gpu]'")

    # ------------------------------------------------------------------ artifacts

    @property
    def rewrite_target(self) -> str:
        """The ONNX form of quantized layers this engine runs (``MatMulNBits`` is
        onnxruntime's own operator; TensorRT takes ``DequantizeLinear``)."""
        return "tensorrt" if self.engine == "tensorrt" or self.provider == "tensorrt" else "onnxruntime"

    @property
    def references(self) -> tuple[str, ...]:
        """The original quantized by onnxruntime's own quantizers that this target runs
        (`mixrank.exporter.REFERENCES`): on the CPU, ``quantize_dynamic``'s int8 and the
        weight-only int8 and int4; on CUDA the weight-only ones (``MatMulInteger`` would
        fall back to the CPU); none for TensorRT, which runs neither ``MatMulNBits`` nor
        ``MatMulInteger``."""
        if self.rewrite_target != "onnxruntime":
            return ()
        return ("int8_dynamic", "int8", "int4") if self.provider == "cpu" else ("int8", "int4")

    def artifact(self, tag: str) -> str:
        """The built artifact of ``tag`` (``original``, ``compressed``, ``original.<reference>``)."""
        if self.engine == "tensorrt":
            return f"{tag}.{self.precision}.engine"
        return f"{tag}.ort.onnx" if self.provider == "cpu" else f"{tag}.ort-{self.provider}.onnx"

    def settings(self, batch_sizes: tuple[int, ...], seq_len: int = 128, max_length: int = 128):
        """The engine's settings for these batch sizes (and a text model's timed sequence
        length, and its longest evaluation text: TensorRT's profile covers both)."""
        if self.engine == "tensorrt":
            from mixrank.engines import TrtSettings

            top = max(batch_sizes)
            return TrtSettings(precision=self.precision, min_batch=1, opt_batch=top, max_batch=top,
                               opt_seq=seq_len, max_seq=max(seq_len, max_length))
        from mixrank.engines import OrtSettings

        return OrtSettings(provider=self.provider, threads=self.threads, trt_fp16=self.precision == "fp16")

    def build(self, onnx_path: Path, out_path: Path, settings, calibration=None) -> None:
        if self.engine == "tensorrt":
            from mixrank.engines import build_engine

            build_engine(onnx_path, out_path, settings, calibration=calibration)
        else:
            from mixrank.engines import build_ort

            build_ort(onnx_path, out_path, settings)

    def describe(self) -> dict:
        """What produced the numbers of a report: engine, provider, precision, device."""
        out = {"engine": self.engine}
        if self.engine == "onnxruntime":
            out["provider"] = self.provider
        if self.rewrite_target == "tensorrt":
            out["precision"] = self.precision
        out["device"] = gpu_name() if self.engine == "tensorrt" or self.provider != "cpu" else "cpu"
        return out

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.describe().items())


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a description only
        return None

