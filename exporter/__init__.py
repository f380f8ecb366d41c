"""mixrank.exporter: torch → ONNX export, the ONNX graph rewriter, verification, the CLI.

    export_onnx(model, example, "original.onnx")
    report = rewrite_onnx("original.onnx", "model.mixrank.safetensors", "compressed.onnx")
    verify_rewrite("compressed.onnx", model, factors, images)
    check_tensorrt_compat("compressed.onnx")

Importing this package imports neither tensorrt nor initialises CUDA.
"""

from ._export import export_onnx
from ._onnxio import load_onnx, model_bytes, onnx_file_bytes, save_onnx
from ._rewrite import RewriteReport, find_weight_sites, rewrite_onnx
from ._trt_check import SUPPORTED_OPS, TRT_VERSION, check_tensorrt_compat
from ._verify import Tolerance, compare_outputs, run_onnxruntime, verify_rewrite

__all__ = [
    "SUPPORTED_OPS", "TRT_VERSION", "RewriteReport", "Tolerance", "check_tensorrt_compat",
    "compare_outputs", "export_onnx", "find_weight_sites", "load_onnx", "model_bytes",
    "onnx_file_bytes", "rewrite_onnx", "run_onnxruntime", "save_onnx", "verify_rewrite",
]
