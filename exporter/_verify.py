"""Output comparison with named tolerances, and the one copy of the output metrics
(top-k accuracy, agreement, cosine) that the verifiers (`export_onnx`,
`verify_rewrite`), the engines' fidelity measurement and ``mixrank eval`` share. NumPy
and onnxruntime only: an engine process imports it without torch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mixrank.core import import_onnxruntime


@dataclass(frozen=True)
class Tolerance:
    """An output agrees when ``|a − b| <= atol + rtol·|b|`` element-wise, or, for
    whole-tensor agreement, when the cosine is at least ``min_cosine`` and the max
    error relative to the reference's max magnitude is at most ``max_rel``."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.99999
    max_rel: float = 1e-3

    @classmethod
    def fp32(cls) -> Tolerance:
        return cls()

    @classmethod
    def fp16(cls) -> Tolerance:
        return cls(atol=1e-2, rtol=1e-2, min_cosine=0.999, max_rel=2e-2)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 accuracy of (N, classes) ``logits`` against integer ``labels``."""
    out = np.asarray(logits).reshape(len(logits), -1)
    labels = np.asarray(labels)
    top5 = np.argsort(-out, axis=1)[:, :5]
    return {"top1": float((top5[:, 0] == labels).mean()),
            "top5": float((top5 == labels[:, None]).any(1).mean())}


def output_agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Per-sample comparison of two (N, ...) outputs, ``got`` against ``ref``: max abs/rel error, the mean, 5th
    percentile and least cosine, and top-1 agreement (argmax over the flattened sample)."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(got, np.float64).reshape(len(got), -1)
    diff = np.abs(a - b)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return {"samples": int(len(a)), "max_abs": float(diff.max()),
            "max_rel": float(diff.max() / max(np.abs(a).max(), 1e-12)),
            "cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_min": float(cos.min()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}


def run_onnxruntime(path: str | os.PathLike, feeds: dict, threads: int | None = None) -> list:
    """The outputs of the ONNX file ``path`` run once on onnxruntime's CPU provider on
    ``feeds`` (input name → array), with ``threads`` intra-op threads (``None``: all)."""
    ort = import_onnxruntime()

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                    tol: Tolerance) -> dict:
    """Compare named outputs ``got`` with ``ref`` under the `Tolerance` ``tol``. Returns a
    report with ``ok``, a ``message`` and, per output, max abs error, max rel error (to the
    reference's max magnitude), cosine, and the worst element."""
    outputs, ok, msgs = {}, True, []
    for name, a in ref.items():
        b = got[name]
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            outputs[name] = {"ok": False, "shape": [list(a64.shape), list(b64.shape)]}
            ok = False
            msgs.append(f"{name}: shape {a64.shape} vs {b64.shape}")
            continue
        diff = np.abs(a64 - b64)
        scale = max(float(np.abs(a64).max()), 1e-12)
        cos = float((a64 * b64).sum() / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-300))
        worst = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
        elem_ok = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(a64)))
        whole_ok = cos >= tol.min_cosine and float(diff.max(initial=0)) / scale <= tol.max_rel
        this_ok = elem_ok or whole_ok
        outputs[name] = {
            "ok": this_ok, "max_abs": float(diff.max(initial=0)),
            "max_rel": float(diff.max(initial=0)) / scale, "cosine": cos,
            "worst_index": [int(i) for i in worst],
            "worst_ref": float(a64[worst]) if diff.size else 0.0,
            "worst_got": float(b64[worst]) if diff.size else 0.0,
        }
        if not this_ok:
            ok = False
            o = outputs[name]
            msgs.append(f"{name}: max abs {o['max_abs']:.3g} (rel {o['max_rel']:.3g}), cosine "
                        f"{cos:.6f}; worst at {tuple(o['worst_index'])}: expected "
                        f"{o['worst_ref']:.6g}, got {o['worst_got']:.6g}")
    return {"ok": ok, "outputs": outputs, "tolerance": tol.__dict__, "message": "; ".join(msgs)}
