"""Choosing an artifact's form by measuring it on the engine that will run it: how
onnxruntime holds the integer weights (`mixrank.exporter.INT_WEIGHTS`) is faster one way
on one CPU and the other way on another, so the choice is timed, not assumed."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from mixrank.core import MixrankError

from ._measure import TimingConfig, throughput
from .runners import SEQ_LEN, make_runner

# the integer weight forms that compute the same result, between which timing alone may choose ("dynamic" quantizes
# activations: another result, chosen only by name)
SAME_RESULT = ("packed", "expanded")


def fastest(candidates: dict[str, str | os.PathLike], batches: tuple[int, ...], settings=None,
            seconds: float = 3.0, seq_len: int = SEQ_LEN, engine: str = "onnxruntime") -> tuple[str, dict]:
    """The candidate with the least geometric mean of its median latencies over
    ``batches`` (timed interleaved on ``engine``, at most ``seconds`` per batch size), and
    the record of the timing: per candidate and batch size, the median in ms.

    Raises:
        MixrankError: no candidates, or one the engine cannot load.
    """
    if not candidates:
        raise MixrankError("nothing to choose from")
    runners = {name: make_runner(engine, p, settings) for name, p in candidates.items()}
    try:
        cfg = TimingConfig(warmup=2, min_rounds=3, max_rounds=20, iters_per_round=3, max_seconds=seconds)
        p50 = {name: {} for name in runners}
        for b in batches:
            t = throughput(runners, b, cfg, progress=False, seq_len=seq_len)
            for name, s in t["sessions"].items():
                p50[name][str(b)] = round(s["p50_ms"], 4)
    finally:
        for r in runners.values():
            r.close()
    score = {name: math.fsum(math.log(v) for v in ms.values()) for name, ms in p50.items()}
    best = min(score, key=score.get)
    return best, {"chosen": best, "p50_ms": p50, "seconds_per_batch": seconds}


def rewrite_fastest(onnx_path, factors, out_path, weights: str = "auto", batches: tuple[int, ...] = (1, 32),
                    settings=None, seconds: float = 3.0, seq_len: int = SEQ_LEN, **rewrite_args):
    """`mixrank.exporter.rewrite_onnx` with the integer weights in the form ``weights``
    (``"packed"``, ``"expanded"``, ``"dynamic"``), or with ``"auto"``, in the form of
    `SAME_RESULT` that runs faster on onnxruntime with ``settings`` (`fastest`: both written,
    timed at ``batches``, the slower removed). A model without integer weights, or one for TensorRT, has one form.

    Returns:
        (the `RewriteReport`, the timing record of the choice or ``None``).
    """
    from mixrank.exporter import INT_WEIGHTS, rewrite_onnx

    if weights != "auto" and weights not in INT_WEIGHTS:
        raise MixrankError(f"unknown integer weight form {weights!r}; choose auto, {', '.join(INT_WEIGHTS)}")
    layers = factors.layers.values()
    integer = any(i.precision.startswith("int") or (i.form == "residual") for i in layers)
    if weights != "auto" or not integer or rewrite_args.get("target", "onnxruntime") != "onnxruntime":
        form = "packed" if weights == "auto" else weights
        return rewrite_onnx(onnx_path, factors, out_path, weights=form, **rewrite_args), None
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".mixrank-forms-", dir=out.parent) as tmp:
        paths = {w: Path(tmp) / w / out.name for w in SAME_RESULT}
        for w, p in paths.items():
            p.parent.mkdir()
            rewrite_onnx(onnx_path, factors, p, weights=w, **rewrite_args)
        best, record = fastest(paths, batches, settings, seconds, seq_len)
    rep = rewrite_onnx(onnx_path, factors, out_path, weights=best, **rewrite_args)
    return rep, record
