"""mixrank.engines: engine builders, footprint and throughput measurement, reports, CI gate.

    res = measure("original.onnx", "compressed.onnx", batches=(1, 32))
    rep = build_report(res, factors.plan)
    write_report(rep, "out/")
    verdict = check_report(rep, load_limits("limits.toml"))

Engines are `Runner` implementations registered in `RUNNERS` (``onnxruntime``,
``tensorrt``); ``measure`` and the peak-memory probe take any of them. The tensorrt
package is imported only when a TensorRT engine is built or loaded, and names are
imported on first use, so that the peak-memory probe's process loads only its engine.
"""

from mixrank.core import lazy_exports

lazy_exports(globals(), {
    "._choose": ("fastest", "rewrite_fastest"),
    "._errors": ("EXIT_LIMIT_FAILED", "EXIT_NOT_MEASURED", "EXIT_OK", "NotInstalledError"),
    "._latency": ("cache_dir", "engine_record", "latency_table", "rank_grid"),
    "._gate": ("check_report", "format_results", "junit_xml", "load_budget", "load_limits"),
    "._measure": ("Measurement", "TimingConfig", "fidelity", "matmul_flops", "measure", "onnx_params", "peak_rss",
                  "throughput"),
    "._report": ("REPORT_SCHEMA", "build_report", "read_report", "report_markdown", "write_report"),
    ".runners": ("PROVIDERS", "RUNNERS", "OrtRunner", "OrtSettings", "Runner", "TensorSpec", "TrtRunner", "TrtSettings",
                 "available_providers", "build_engine", "build_ort", "check_two_gemms", "import_tensorrt",
                 "make_runner", "ort_session", "random_feeds", "run_all"),
})
