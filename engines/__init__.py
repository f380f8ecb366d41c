"""mixrank.engines: engine builders, footprint and throughput measurement, reports, CI gate.

    res = measure("original.onnx", "compressed.onnx", batches=(1, 32))
    rep = build_report(res, factors.plan)
    write_report(rep, "out/")
    verdict = check_report(rep, load_budget("budget.toml"))

TensorRT lives in `engines._tensorrt` and is imported only when used.
"""

from ._errors import EXIT_LIMIT_FAILED, EXIT_NOT_MEASURED, EXIT_OK, NotInstalledError
from ._gate import check_report, format_results, junit_xml, load_budget
from ._measure import (
    TimingConfig,
    fidelity,
    matmul_flops,
    measure,
    onnx_params,
    peak_rss,
    throughput,
)
from ._ort import OrtSettings, available_providers, ort_session
from ._report import build_report, report_markdown, write_report

__all__ = [
    "EXIT_LIMIT_FAILED", "EXIT_NOT_MEASURED", "EXIT_OK", "NotInstalledError", "OrtSettings",
    "TimingConfig", "available_providers", "build_report", "check_report", "fidelity",
    "format_results", "junit_xml", "load_budget", "matmul_flops", "measure", "onnx_params",
    "ort_session", "peak_rss", "report_markdown", "throughput", "write_report",
]
