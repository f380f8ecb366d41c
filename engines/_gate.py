"""The CI gate: a limits file evaluated against a report.

Limits file (TOML)::

    max_param_ratio = 0.5          # compressed / original parameters
    max_initializer_bytes_ratio = 0.5
    max_bytes_ratio_vs_int8 = 0.6  # compressed file / the original quantized to int8 by onnxruntime
    max_engine_bytes = 50_000_000  # needs an engine in the report
    min_speedup = { 32 = 1.2 }     # per batch size
    min_speedup_vs_int8 = { 1 = 1.0 }  # vs the faster of quantize_dynamic's int8 and weight-only int8
    max_latency_p99_ms = { 1 = 20.0 }
    max_top1_drop = 0.01           # needs labels
    min_top1_agreement = 0.97
    min_cosine = 0.99              # mean per-sample cosine of the outputs (embeddings, logits)
    min_cosine_p5 = 0.95           # its 5th percentile: the worst twentieth of the inputs
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from mixrank.core import read_toml_text

from ._errors import EXIT_LIMIT_FAILED, EXIT_NOT_MEASURED, EXIT_OK, MixrankError

# key -> (report summary field or per-batch template, direction)
SCALAR_LIMITS = {
    "max_param_ratio": ("param_ratio", "max"),
    "max_initializer_bytes_ratio": ("initializer_bytes_ratio", "max"),
    "max_file_bytes_ratio": ("file_bytes_ratio", "max"),
    "max_bytes_ratio_vs_int8": ("bytes_ratio_vs_int8", "max"),
    "max_engine_bytes": ("engine_bytes", "max"),
    "max_top1_drop": ("top1_drop", "max"),
    "min_top1_agreement": ("top1_agreement", "min"),
    "min_cosine": ("cosine_mean", "min"),
    "min_cosine_p5": ("cosine_p5", "min"),
}
BATCH_LIMITS = {
    "min_speedup": ("speedup_b{}", "min"),
    "min_speedup_vs_int8": ("speedup_vs_fastest_int8_b{}", "min"),
    "max_latency_p99_ms": ("latency_p99_ms_b{}", "max"),
}


@dataclass
class Limit:
    key: str
    field: str
    direction: str
    value: float
    line: int


def _line_of(text: str, key: str) -> int:
    """The line that sets ``key`` (``key = ...`` or a ``[key]`` table header); 0 if none."""
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*(\[\[?\s*)?{re.escape(key)}\s*(=|\]\]?)", line):
            return i
    return 0


def load_limits(path: str | os.PathLike) -> list[Limit]:
    """Parse a TOML limits file.

    Raises:
        MixrankError: missing file, TOML syntax error (with its line), unknown key or
            malformed value (named, with its line).
    """
    data, text = read_toml_text(path, "limits file")
    limits = []
    for key, value in data.items():
        line = _line_of(text, key)
        where = f"{path}:{line}"
        if key in SCALAR_LIMITS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MixrankError(f"{where}: {key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise MixrankError(f"{where}: {key} must be a finite number, got {value!r}")
            field, direction = SCALAR_LIMITS[key]
            limits.append(Limit(key, field, direction, float(value), line))
        elif key in BATCH_LIMITS:
            if not isinstance(value, dict) or not value:
                raise MixrankError(f"{where}: {key} must be a table of batch size = value, "
                                   f"e.g. {key} = {{ 32 = 1.2 }}, got {value!r}")
            tmpl, direction = BATCH_LIMITS[key]
            for b, v in value.items():
                if not re.fullmatch(r"[0-9]{1,9}", str(b)) or int(b) < 1:  # "²".isdigit() is true
                    raise MixrankError(f"{where}: {key}: batch size {b!r} is not a positive integer")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise MixrankError(f"{where}: {key}.{b} must be a number, got {v!r}")
                if not math.isfinite(v):
                    raise MixrankError(f"{where}: {key}.{b} must be a finite number, got {v!r}")
                limits.append(Limit(f"{key}[{b}]", tmpl.format(int(b)), direction, float(v), line))
        else:
            known = ", ".join(sorted([*SCALAR_LIMITS, *BATCH_LIMITS]))
            raise MixrankError(f"{where}: unknown key {key!r}; known keys: {known}")
    if not limits:
        raise MixrankError(f"{path} sets no limit")
    return limits


def load_budget(path: str | os.PathLike) -> list[Limit]:
    """Deprecated name of `load_limits` (the CI file is a limits file; the budget is the
    compression's)."""
    warnings.warn("load_budget is deprecated: use load_limits", FutureWarning, stacklevel=2)
    return load_limits(path)


def check_report(report: dict, limits: list[Limit]) -> dict:
    """Evaluate limits against ``report['summary']``. Returns ``{"results": [...],
    "exit_code"}``: 0 all pass, 1 a limit failed, 3 something could not be measured.

    Raises:
        MixrankError: ``report`` is not a report (a dict whose summary is a dict), or
            ``limits`` is not a list of `Limit` (what `load_limits` returns).
    """
    if not isinstance(report, dict) or not isinstance(report.get("summary", {}), dict):
        raise MixrankError("check_report takes a report: a dict with a 'summary' dict (read_report reads one)")
    try:
        limits = None if isinstance(limits, str | bytes | dict) else list(limits)
    except TypeError:
        limits = None
    if limits is None or not all(isinstance(x, Limit) for x in limits):
        raise MixrankError("check_report takes the limits that load_limits returns (a list of Limit)")
    summary = report.get("summary", {})
    results = []
    for lim in limits:
        measured = summary.get(lim.field)
        if measured is not None and (isinstance(measured, bool) or not isinstance(measured, int | float)):
            raise MixrankError(f"the report's {lim.field} is not a number ({measured!r}): it is not a report "
                               "mixrank wrote; rerun mixrank bench")
        if measured is None or not math.isfinite(measured):  # what could not be measured is written as null
            verdict = "not measured"
        elif lim.direction == "max":
            verdict = "pass" if measured <= lim.value else "FAIL"
        else:
            verdict = "pass" if measured >= lim.value else "FAIL"
        results.append({"limit": lim.key, "field": lim.field, "direction": lim.direction,
                        "value": lim.value, "measured": measured, "verdict": verdict})
    if any(r["verdict"] == "FAIL" for r in results):
        code = EXIT_LIMIT_FAILED
    elif any(r["verdict"] == "not measured" for r in results):
        code = EXIT_NOT_MEASURED
    else:
        code = EXIT_OK
    return {"results": results, "exit_code": code}


def format_results(res: dict) -> str:
    """`check_report`'s results as text, one line per limit."""
    lines = []
    for r in res["results"]:
        op = "<=" if r["direction"] == "max" else ">="
        m = "-" if r["measured"] is None else f"{r['measured']:.6g}"
        lines.append(f"{r['verdict']:>12}  {r['limit']:<28} measured {m:>12}  limit {op} {r['value']:g}")
    return "\n".join(lines)


def junit_xml(res: dict, suite: str = "mixrank.check") -> str:
    """`check_report`'s results as JUnit XML: one test case per limit in test suite
    ``suite``, a failed limit a failure, an unmeasured one an error."""
    cases = []
    fails = sum(r["verdict"] == "FAIL" for r in res["results"])
    errors = sum(r["verdict"] == "not measured" for r in res["results"])
    for r in res["results"]:
        name = quoteattr(r["limit"])
        msg = f"measured {r['measured']} vs {r['direction']} {r['value']}"
        if r["verdict"] == "FAIL":
            body = f"<failure message={quoteattr(msg)}>{escape(msg)}</failure>"
        elif r["verdict"] == "not measured":
            body = f"<error message={quoteattr('not measured: ' + r['field'])}/>"
        else:
            body = ""
        cases.append(f'  <testcase classname="{suite}" name={name}>{body}</testcase>')
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="{suite}" '
            f'tests="{len(res["results"])}" failures="{fails}" errors="{errors}">\n'
            + "\n".join(cases) + "\n</testsuite>\n")
