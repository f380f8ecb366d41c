"""report.json, report.md and plots from a measurement."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from mixrank.core import MixrankError, atomic_write, atomic_write_text, json_text, loads_json
from mixrank.exporter import REFERENCES

REPORT_SCHEMA = 1  # report.json's schema version: `mixrank check` refuses any other


def _versions() -> dict:
    import importlib.metadata

    import numpy
    import onnx
    import torch

    ort = "not installed"
    for dist in ("onnxruntime", "onnxruntime-gpu"):  # which build, not only which version
        try:
            ort = f"{importlib.metadata.version(dist)} ({dist})"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": ort, "numpy": numpy.__version__}
    try:
        from importlib.metadata import version

        v["mixrank"] = version("mixrank")
    except Exception:
        v["mixrank"] = "unknown"
    return v


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "hostname": platform.node()}


def build_report(measurement: dict, factors_plan=None, rewrite: dict | None = None) -> dict:
    """Assemble the report: the ``measurement`` (a `Measurement`), versions, machine, the headline ratios
    (``summary``), and optionally ``factors_plan``'s per-layer table (a `Plan`; ``None``:
    none) and the ``rewrite`` report (``rewrite_onnx``'s, as a dict)."""
    fp = measurement["footprint"]
    o, c = fp["original"], fp["compressed"]
    summary = {
        "param_ratio": c["params"] / o["params"],
        "initializer_bytes_ratio": c["initializer_bytes"] / o["initializer_bytes"],
        "file_bytes_ratio": c["file_bytes"] / o["file_bytes"],
        "peak_rss_saved_bytes": o["peak_rss_bytes"] - c["peak_rss_bytes"],
        "weight_bytes_saved": o["initializer_bytes"] - c["initializer_bytes"],
    }
    for t in measurement["throughput"]:
        b = t["batch"]
        summary[f"speedup_b{b}"] = t.get("speedup")
        summary[f"ideal_speedup_b{b}"] = t.get("ideal_speedup")
        summary[f"latency_p99_ms_b{b}"] = t["sessions"]["compressed"]["p99_ms"]
    fid = measurement.get("fidelity")
    if fid:
        for k in ("top1_agreement", "cosine_mean", "cosine_p5", "logits_kl", "top1_drop", "top1_original",
                  "top1_compressed"):
            if k in fid:
                summary[k] = fid[k]
    for name in measurement.get("references", []):  # the compressed model against each alternative
        r = fp[name]
        summary[f"{name}_file_bytes_ratio"] = r["file_bytes"] / o["file_bytes"]
        summary[f"bytes_ratio_vs_{name}"] = c["file_bytes"] / r["file_bytes"]
        summary[f"{name}_peak_rss_bytes"] = r["peak_rss_bytes"]
        for t in measurement["throughput"]:
            p50 = {k: v["p50_ms"] for k, v in t["sessions"].items()}
            summary[f"speedup_vs_{name}_b{t['batch']}"] = p50[name] / p50["compressed"]
        rf = (measurement.get("reference_fidelity") or {}).get(name)
        if rf:
            for k in ("top1_agreement", "cosine_mean", "cosine_p5"):
                if k in rf:
                    summary[f"{name}_{k}"] = rf[k]
            if "top1_compressed" in rf:
                summary[f"{name}_top1"] = rf["top1_compressed"]
    _winners(summary, measurement)
    predicted = latency_prediction(measurement, factors_plan)
    if predicted:
        summary.update({f"latency_{k}": v for k, v in predicted.items()
                        if k in ("predicted_ratio", "measured_ratio", "prediction_error", "budget_met")})
    rep = {"schema_version": REPORT_SCHEMA, "summary": summary, "measurement": measurement,
           "versions": _versions(), "machine": machine()}
    if factors_plan:
        rep["layers"] = {n: {"shape": i.shape, "rank": i.rank, "dense": i.dense, "precision": i.precision,
                             "sparse": i.sparse, "nmse": i.nmse, "params_before": i.params_before,
                             "params_after": i.params_after, "bytes_after": i.bytes_after, "form": i.form}
                         for n, i in factors_plan.layers.items()}
        rep["compression"] = {"method": factors_plan.method, "budget": factors_plan.budget,
                              "totals": factors_plan.totals}
        like = factors_plan.source.get("like")
        if like:
            rep["compression"]["like"] = like
    if rewrite:
        rep["rewrite"] = rewrite
    if predicted:
        rep["latency"] = predicted
    return rep


def latency_prediction(measurement: dict, plan) -> dict | None:
    """The plan's predicted latency (a latency budget's, ``plan.latency``) beside the
    compressed model's measured p50 at the same batch. The prediction is in the table's
    conditions (the original timed alone); the report's sessions run interleaved, so it is
    compared as a fraction of the original: ``predicted_ratio`` (predicted over the
    original's time in the table) against ``measured_ratio`` (compressed over original in
    this run); ``prediction_error`` is their ratio minus 1, and ``predicted_here_ms`` the
    prediction at this run's original time. ``None`` without a latency budget; without
    ``measured_ms`` when that batch was not timed."""
    lat = None if plan is None else plan.get("latency")
    if not lat:
        return None
    at = next((t for t in measurement["throughput"] if t["batch"] == lat["batch"]), None)
    out = {k: lat[k] for k in ("asked", "budget_ms", "batch", "predicted_ms", "original_ms") if k in lat}
    if at is None:
        out["note"] = f"batch {lat['batch']} was not timed"
        return out
    measured, original = at["sessions"]["compressed"]["p50_ms"], at["sessions"]["original"]["p50_ms"]
    predicted_ratio = lat["predicted_ms"] / lat["original_ms"]
    budget_ratio = lat["budget_ms"] / lat["original_ms"]
    out.update({"measured_ms": measured, "original_measured_ms": original, "predicted_ratio": predicted_ratio,
                "measured_ratio": measured / original, "predicted_here_ms": predicted_ratio * original,
                "prediction_error": (measured / original) / predicted_ratio - 1,
                "budget_met": measured / original <= budget_ratio})
    return out


INT8_REFERENCES = ("int8_dynamic", "int8")


def _winners(summary: dict, measurement: dict) -> None:
    """Add to ``summary`` which artifact is the smallest file (``smallest``) and the fastest
    at each batch size (``fastest_b<batch>``), and the compressed model's speedup over the
    faster of the int8 references (``speedup_vs_fastest_int8_b<batch>``, what
    ``min_speedup_vs_int8`` gates)."""
    fp = measurement["footprint"]
    names = ["original", "compressed", *measurement.get("references", [])]
    summary["smallest"] = min(names, key=lambda n: fp[n]["file_bytes"])
    for t in measurement["throughput"]:
        p50 = {n: t["sessions"][n]["p50_ms"] for n in names}
        summary[f"fastest_b{t['batch']}"] = min(names, key=p50.get)
        int8 = [n for n in INT8_REFERENCES if n in p50]
        if int8:
            summary[f"speedup_vs_fastest_int8_b{t['batch']}"] = min(p50[n] for n in int8) / p50["compressed"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def report_markdown(rep: dict) -> str:
    """report.md: the table of original, compressed and references, and what produced it."""
    m = rep["measurement"]
    fp = m["footprint"]
    refs = m.get("references", [])
    cols = ["original", "compressed", *refs]
    o, c = fp["original"], fp["compressed"]

    def row(label, values, change=""):
        return (label, *values, change)

    rows = [
        row("parameters", [f"{fp[k]['params']:,}" for k in cols], f"{c['params'] / o['params']:.3f}x"),
        row("initializer bytes", [_fmt_bytes(fp[k]["initializer_bytes"]) for k in cols],
            f"{c['initializer_bytes'] / o['initializer_bytes']:.3f}x"),
        row("ONNX file bytes", [_fmt_bytes(fp[k]["file_bytes"]) for k in cols],
            f"{c['file_bytes'] / o['file_bytes']:.3f}x"
            + "".join(f"; {c['file_bytes'] / fp[r]['file_bytes']:.2f}x of {r}" for r in refs)),
        row(f"peak RSS ({m['engine']}, batch 1)", [_fmt_bytes(fp[k]["peak_rss_bytes"]) for k in cols],
            f"{c['peak_rss_bytes'] / o['peak_rss_bytes']:.3f}x"),
    ]
    for key, label in (("device_memory_bytes", "engine device memory (TensorRT)"),
                       ("engine_bytes", "engine file bytes")):
        if all(key in fp[k] for k in cols):
            rows.append(row(label, [_fmt_bytes(fp[k][key]) for k in cols],
                            f"{c[key] / max(o[key], 1):.3f}x"))
    text = m.get("seq_len") is not None
    unit = "texts" if text else "images"
    for t in m["throughput"]:
        ss, sp = t["sessions"], t["speedup_spread"]
        at = f", {m['seq_len']} tokens" if text else ""
        rows.append(row(f"batch {t['batch']}{at} latency p50 / p99 (ms)",
                        [f"{ss[k]['p50_ms']:.2f} / {ss[k]['p99_ms']:.2f}" for k in cols],
                        f"{t['speedup']:.2f}x faster (rounds {sp['min']:.2f}-{sp['max']:.2f}; "
                        f"FLOP ideal {t['ideal_speedup']:.2f}x)"
                        + "".join(f"; {ss[r]['p50_ms'] / ss['compressed']['p50_ms']:.2f}x vs {r}" for r in refs)))
        rows.append(row(f"batch {t['batch']} {unit}/s", [f"{ss[k]['images_per_s']:.1f}" for k in cols]))
    fid = m.get("fidelity")
    if fid:
        rows += _fidelity_rows(fid, m.get("reference_fidelity") or {}, refs, unit, row)
    head = ["", *cols, "change"]
    lines = ["# mixrank report", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    ev = m.get("evaluation")
    if ev:
        what = "Fidelity and accuracy" if fid and "top1_original" in fid else "Fidelity"
        held = {True: "", False: f" (the calibration {unit}: NOT held out)",
                None: " (held out or not: unknown here; mixrank bench does not see the calibration data)"}
        line = f"{what} on {ev['samples']} {unit}: {ev['source']}{held[ev.get('held_out', True)]}."
        if "truncated" in ev:  # texts: what was read, skipped and cut, always stated
            first = f" (lines {', '.join(map(str, ev['skipped_lines'][:5]))}...)" if ev.get("skipped_lines") else ""
            line += (f" Texts: {ev.get('read')} read, {ev.get('skipped')} skipped{first}, {ev['truncated']} cut to "
                     f"{ev.get('max_length')} tokens.")
            if ev.get("shared_with_calibration"):
                line += f" {ev['shared_with_calibration']} of them are calibration texts too."
        elif ev.get("note"):
            line += f" {ev['note']}."
        lines += ["", line]
    like = (rep.get("compression") or {}).get("like")
    if like:
        lines += ["", like_line(like, fp)]
    if refs:
        lines += ["", "References, what a user gets without mixrank: " + "; ".join(
            f"`{r}` = the original quantized by {REFERENCES.get(r, r)}" for r in refs) + "."]
    s = rep["summary"]
    if "smallest" in s:
        fastest = [(t["batch"], s.get(f"fastest_b{t['batch']}")) for t in m["throughput"]]
        lines += ["", f"Smallest file: `{s['smallest']}`. Fastest: "
                  + ", ".join(f"`{name}` at batch {b}" for b, name in fastest if name) + "."]
    lat = rep.get("latency")
    if lat and "measured_ms" in lat:
        lines += ["", f"Latency budget {lat['asked']} at batch {lat['batch']} ({lat['budget_ms']:.2f} ms: the "
                  f"original took {lat['original_ms']:.2f} ms when the table was measured, alone): predicted "
                  f"{lat['predicted_ratio']:.3f}x of the original ({lat['predicted_ms']:.2f} ms), measured "
                  f"{lat['measured_ratio']:.3f}x here ({lat['measured_ms']:.2f} ms against "
                  f"{lat['original_measured_ms']:.2f} ms, interleaved): {100 * lat['prediction_error']:+.1f} % "
                  f"of the prediction; budget {'met' if lat['budget_met'] else 'NOT met'}."]
    lines += ["", engine_line(m, rep)]
    return "\n".join(lines) + "\n"


def _fidelity_rows(fid: dict, rf: dict, refs: list[str], unit: str, row) -> list[tuple]:
    """The report's fidelity rows: accuracy and top-1 agreement of logits, or the
    cosine of embeddings, for the compressed model and each reference."""
    rows = []
    if "top1_original" in fid:
        rows.append(row("top-1 accuracy", [f"{100 * fid['top1_original']:.2f} %",
                                           f"{100 * fid['top1_compressed']:.2f} %",
                                           *(f"{100 * rf[r]['top1_compressed']:.2f} %" for r in refs)],
                        f"{-100 * fid['top1_drop']:+.2f} pt"))
    if "top1_agreement" in fid:
        rows.append(row("top-1 agreement / logits cosine",
                        ["", f"{100 * fid['top1_agreement']:.2f} % / {fid['cosine_mean']:.5f}",
                         *(f"{100 * rf[r]['top1_agreement']:.2f} % / {rf[r]['cosine_mean']:.5f}" for r in refs)],
                        f"{fid['samples']} {unit}"))
    else:
        rows.append(row("embedding cosine mean / p5",
                        ["", f"{fid['cosine_mean']:.5f} / {fid['cosine_p5']:.5f}",
                         *(f"{rf[r]['cosine_mean']:.5f} / {rf[r]['cosine_p5']:.5f}" for r in refs)],
                        f"{fid['samples']} {unit}"))
    return rows


def like_line(like: dict, fp: dict) -> str:
    """The ``--like`` budget: the sibling named, what it would have cost, what was built."""
    unit = "float32 weight bytes" if like.get("unit") == "bytes" else "parameters"
    return (f"Budget: the size of {like['name']}, {like['countable_params']:,} parameters "
            f"({_fmt_bytes(like['fp32_bytes'])} at float32), by {unit}; that sibling would cost that much as "
            f"trained. The compressed model: {fp['compressed']['params']:,} parameters, "
            f"{_fmt_bytes(fp['compressed']['file_bytes'])} ONNX file.")


def engine_line(m: dict, rep: dict) -> str:
    """Which engine, with which settings, on which machine produced the numbers."""
    s = m["settings"]
    device = (m.get("target") or {}).get("device")
    where = f"device {device}; " if device and device != "cpu" else ""
    if m["engine"] == "onnxruntime":
        return (f"Every number above: {m['engine']} ({s['provider']}, threads={s['threads'] or 'default'}, "
                f"optimization={s['optimization']}); {where}{rep['machine']['cpus']} CPUs; "
                f"onnxruntime {rep['versions']['onnxruntime']}.")
    settings = ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)
    version = m.get("runner", {}).get(m["engine"], "unknown version")
    return f"Every number above: {m['engine']} {version} ({settings}); {where}{rep['machine']['cpus']} CPUs."


def read_report(path: str | os.PathLike) -> dict:
    """Read a report.json that `write_report` wrote (of a schema version this mixrank knows).

    Raises:
        MixrankError: missing, not UTF-8 JSON, not a report, or another schema version.
    """
    p = Path(path)
    if not p.is_file():
        raise MixrankError(f"report {p} does not exist (run mixrank bench or mixrank run first)")
    try:
        rep = loads_json(p.read_bytes().decode("utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise MixrankError(f"{p} is not a JSON report: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MixrankError(f"{p} is not a JSON report: {e}") from None
    if not isinstance(rep, dict) or "schema_version" not in rep:
        what = f"a JSON {type(rep).__name__}" if not isinstance(rep, dict) else "JSON without a schema_version"
        raise MixrankError(f"{p} is not a mixrank report ({what}); give the report.json of mixrank bench/run")
    if rep["schema_version"] != REPORT_SCHEMA:
        raise MixrankError(f"{p} has report schema version {rep['schema_version']!r}; this mixrank reads "
                           f"version {REPORT_SCHEMA}")
    if not isinstance(rep.get("summary"), dict):
        raise MixrankError(f"{p} is a mixrank report without a summary object")
    return rep


def write_report(rep: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md, and plots (layers.png, latency.png) into ``out_dir``:
    the plots and the Markdown first and report.json (what `check` reads) last; a failure
    (a full disk, say) removes every one of them, so no report stands without its plots or
    beside another run's. Figures that are not finite are written as ``null``."""
    out = Path(out_dir)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    plots = {}
    try:
        text = json_text(rep)
        plots = write_plots(rep, out)
        for name in PLOT_NAMES:  # a plot this report has none for (no layers) must not be an older report's
            if out / name not in plots.values():
                (out / name).unlink(missing_ok=True)
        atomic_write_text(paths["md"], report_markdown(rep))
        atomic_write_text(paths["json"], text)
    except BaseException:
        for p in [*paths.values(), *plots.values(), *(out / n for n in PLOT_NAMES)]:
            p.unlink(missing_ok=True)
        raise
    return {**paths, **plots}


PLOT_NAMES = ("layers.png", "latency.png")


def write_plots(rep: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    layers = rep.get("layers")
    if layers:
        names = list(layers)
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.25 * len(names)), 6), sharex=True)
        x = range(len(names))
        ax1.bar(x, [i["rank"] or 0 for i in layers.values()], color="tab:blue")
        ax1.set_ylabel("rank (0 = dense)")
        ax2.bar(x, [i["params_before"] for i in layers.values()], color="lightgray", label="original")
        ax2.bar(x, [i["params_after"] for i in layers.values()], color="tab:orange", label="compressed")
        ax2.set_ylabel("parameters")
        ax2.legend()
        ax2.set_xticks(list(x), [n.replace("blocks.", "b") for n in names], rotation=90, fontsize=6)
        fig.suptitle("per-layer rank and parameters")
        fig.tight_layout()
        paths["layers_png"] = atomic_write(out / "layers.png", lambda tmp: fig.savefig(tmp, dpi=110))
        plt.close(fig)
    th = rep["measurement"]["throughput"]
    if not th:  # nothing was timed
        return paths
    fig, axes = plt.subplots(1, len(th), figsize=(4.5 * len(th), 3.5), squeeze=False)
    for ax, t in zip(axes[0], th, strict=True):
        data = [t["sessions"]["original"]["latencies_ms"], t["sessions"]["compressed"]["latencies_ms"]]
        ax.violinplot(data, showmedians=True)
        ax.set_xticks([1, 2], ["original", "compressed"])
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"batch {t['batch']}: {t['speedup']:.2f}x")
    fig.tight_layout()
    paths["latency_png"] = atomic_write(out / "latency.png", lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return paths
