"""mixrank.exporter: torch → ONNX export, the ONNX graph rewriter, verification.

    export_onnx(model, example, "original.onnx")
    report = rewrite_onnx("original.onnx", "model.mixrank.safetensors", "compressed.onnx")
    verify_rewrite("compressed.onnx", model, factors, images)
    check_tensorrt_compat("compressed.onnx")

Importing this package imports neither tensorrt nor initialises CUDA.
"""

from mixrank.core import lazy_exports

lazy_exports(globals(), {
    "._export": ("check_opset", "export_onnx", "verify_rewrite"),
    "._onnxio": ("check_and_save", "check_onnx_output", "external_data_files", "load_onnx", "model_bytes",
                 "onnx_file_bytes", "save_onnx"),
    "._reference": ("REFERENCES", "check_references", "quantize_dynamic_reference", "quantize_reference",
                     "write_reference"),
    "._qlinear": ("INT_WEIGHTS",),
    "._rewrite": ("RewriteReport", "find_weight_sites", "rewrite_onnx"),
    "._trt_check": ("SUPPORTED_OPS", "TRT_VERSION", "check_tensorrt_compat"),
    "._verify": ("Tolerance", "compare_outputs", "output_agreement", "run_onnxruntime", "topk_accuracy"),
})
