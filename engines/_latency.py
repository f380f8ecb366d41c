"""The latency table of a latency budget (docs/design.md, "Latency budgets"): each selected
layer's matrix products timed on the target engine at the layer's tokens per batch — the
dense product, and a factor's two products at a grid of ranks, in float32 and, where the
artifact runs int8 weights dynamically, in dynamic int8 — and the whole original model's
time at that batch. `mixrank.compress.LatencyBudget` predicts a plan's time from it.

Each shape's products are cached on disk (``$MIXRANK_CACHE_DIR/latency``, else
``~/.cache/mixrank/latency``) under a key of the engine, its version and settings (threads,
provider), the machine, the shape and the grid, so that a rerun measures only the original.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mixrank.core import MixrankError, atomic_write_text, import_onnxruntime, json_text

from .runners import SEQ_LEN, make_runner, random_feeds

CACHE_VERSION = 4


def cache_dir() -> Path:
    """Where measured shapes are cached (``MIXRANK_CACHE_DIR``, ``XDG_CACHE_HOME``, ``~/.cache``)."""
    base = os.environ.get("MIXRANK_CACHE_DIR")
    if base:
        return Path(base) / "latency"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixrank" / "latency"


def rank_grid(m: int, n: int) -> list[int]:
    """The ranks a factor's products are timed at: 8, 16, 32, then steps of an eighth of
    ``min(m, n)`` (a multiple of 16, at least 32), and ``min(m, n)`` itself."""
    top = min(m, n)
    step = max(32, int(round(top / 8 / 16)) * 16)
    return sorted({r for r in (8, 16, 32, *range(step, top, step), top) if r <= top})


def _matmul_graph(path: Path, k: int, j: int, compute: str, seed: int, copies: int = 1) -> None:
    """A graph of ``copies`` independent products ``y_i = x W_i`` (x (T, k), W_i (k, j)) as
    the rewriter emits them: ``MatMul`` with float32 weights, or dynamic int8
    (`mixrank.exporter` ``_dynamic_matmul``'s pattern: ``DynamicQuantizeLinear`` →
    ``MatMulInteger`` → ``Cast`` → ``Mul``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, j]) for i in range(copies)]
    nodes, inits = [], []
    for i in range(copies):
        if compute == "float":
            inits.append(numpy_helper.from_array((rng.standard_normal((k, j)) * 0.05).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
            continue
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, j)).astype(np.int8), f"wq{i}"),
                  numpy_helper.from_array(np.zeros(j, np.int8), f"wz{i}"),
                  numpy_helper.from_array(np.full(j, 1e-3, np.float32), f"ws{i}")]
        nodes += [helper.make_node("DynamicQuantizeLinear", ["x"], [f"xq{i}", f"xs{i}", f"xz{i}"]),
                  helper.make_node("MatMulInteger", [f"xq{i}", f"wq{i}", f"xz{i}", f"wz{i}"], [f"acc{i}"]),
                  helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"xs{i}", f"ws{i}"], [f"sc{i}"]),
                  helper.make_node("Mul", [f"accf{i}", f"sc{i}"], [f"y{i}"])]
    model = helper.make_model(helper.make_graph(nodes, "products", [x], ys, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _gather_graph(path: Path, k: int, j: int, seed: int, copies: int, scatter: bool) -> None:
    """A graph of ``copies`` gathers of ``j`` of the ``k`` columns of x (T, k), as a pair's
    ``cols`` layer reads its input; with ``scatter``, each times a mask, as a ``rows`` layer
    scatters its r computed rows back to m."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, j]) for i in range(copies)]
    nodes, inits = [], []
    for i in range(copies):
        inits.append(numpy_helper.from_array(rng.integers(0, k, j).astype(np.int64), f"idx{i}"))
        g = f"g{i}" if scatter else f"y{i}"
        nodes.append(helper.make_node("Gather", ["x", f"idx{i}"], [g], axis=-1))
        if scatter:
            inits.append(numpy_helper.from_array((rng.random(j) < 0.5).astype(np.float32), f"mask{i}"))
            nodes.append(helper.make_node("Mul", [g, f"mask{i}"], [f"y{i}"]))
    model = helper.make_model(helper.make_graph(nodes, "gathers", [x], ys, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _median_ms(run, seconds: float, warmup: int = 3, least: int = 15, most: int = 101) -> float:
    """The median of repeated calls of ``run`` (at least ``least``, then until ``seconds``
    or ``most``), in ms."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < least or (len(times) < most and time.perf_counter() - t0 < seconds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


class _Timer:
    """Times a product on onnxruntime as it runs inside a model's graph: the input and the
    outputs bound in place (``io_binding``: no copy in or out), and the difference of a graph
    of three copies of the product and a graph of one, halved, so that what each call costs
    besides its products (the call itself, waking the thread pool) cancels."""

    COPIES = 3

    def __init__(self, settings, folder: Path, seconds: float):
        self.settings, self.folder, self.seconds = settings, folder, seconds
        self.count = 0
        self.device = "cpu" if settings.provider == "cpu" else "cuda"

    def _run(self, path: Path, tokens: int, k: int, j: int, copies: int) -> float:
        from .runners import ort_session

        ort = import_onnxruntime()
        sess = ort_session(path, self.settings)
        x = np.random.default_rng(0).standard_normal((tokens, k)).astype(np.float32)
        binding = sess.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, self.device, 0))
        for i in range(copies):
            binding.bind_ortvalue_output(f"y{i}", ort.OrtValue.ortvalue_from_shape_and_type(
                [tokens, j], np.float32, self.device, 0))

        def run():
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return _median_ms(run, self.seconds)

    def product(self, tokens: int, k: int, j: int, compute: str) -> float:
        times = []
        for copies in (1, self.COPIES):
            self.count += 1
            path = self.folder / f"product{self.count}.onnx"
            if compute in ("gather", "scatter"):
                _gather_graph(path, k, j, self.count, copies, compute == "scatter")
            else:
                _matmul_graph(path, k, j, compute, self.count, copies)
            times.append(self._run(path, tokens, k, j, copies))
            path.unlink()
        ms = (times[1] - times[0]) / (self.COPIES - 1)
        return round(max(ms, 1e-4), 5)


def _shape_key(tokens: int, m: int, n: int) -> str:
    return f"{tokens}x{m}x{n}"


def _cache_key(engine: dict, tokens: int, m: int, n: int, computes: tuple[str, ...], grid: list[int]) -> str:
    parts = {"v": CACHE_VERSION, "engine": engine, "machine": platform.machine(), "cpu": platform.processor(),
             "cores": os.cpu_count(), "shape": [tokens, m, n], "computes": list(computes), "grid": grid}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(d, dict) and all(isinstance(d.get(s), dict) for s in ("dense", "in", "out", "gather", "scatter"))
    return d if ok else None


def engine_record(engine: str, settings) -> dict:
    """What identifies the engine a table was measured on (the cache's key, the plan's record)."""
    rec: dict = {"engine": engine}
    if engine == "onnxruntime":
        ort = import_onnxruntime()
        rec.update({"version": ort.__version__, "provider": settings.provider, "threads": settings.threads,
                    "optimization": settings.optimization, "spinning": settings.spinning})
    return rec


def latency_table(original_onnx, layers: dict[str, tuple[int, int, int]], batch: int, settings,
                  engine: str = "onnxruntime", computes: tuple[str, ...] = ("float",), seq_len: int = SEQ_LEN,
                  seconds: float = 0.25, original_seconds: float = 3.0, cache: bool = True,
                  progress: bool = True) -> dict:
    """Measure the latency table (the ``latency.json`` object `mixrank.compress.LatencyTable`
    reads) of ``layers`` at ``batch``.

    Args:
        original_onnx: the original model's ONNX file (its whole time at ``batch``).
        layers: layer → (out, in, tokens per sample) (`mixrank.compress.latency_layers`).
        batch: the batch size the budget is at; settings: the engine's settings.
        engine: ``"onnxruntime"`` (a TensorRT engine per product would take minutes).
        computes: ``"float"``, and ``"dynamic"`` where int8 weights run as dynamic int8.
        seq_len: a text model's tokens per input, for the original's random feeds.
        seconds: the timing of each product (median of at least 5 runs).
        original_seconds: the timing of the original.
        cache: read and write the shapes' cache (`cache_dir`).
        progress: a progress bar over the shapes.

    Raises:
        MixrankError: another engine, an unknown compute, no layers.
    """
    from mixrank.compress.allocate import COMPUTES, TABLE_FORMAT

    if engine != "onnxruntime":
        raise MixrankError(f"latency budgets are measured on onnxruntime (cpu or cuda); not on {engine}: building "
                           "a TensorRT engine per timed product would take longer than the compression")
    bad = [c for c in computes if c not in COMPUTES]
    if bad or not computes:
        raise MixrankError(f"unknown compute {bad}; choose from {', '.join(COMPUTES)}")
    if not layers:
        raise MixrankError("no layers to time")
    rec = engine_record(engine, settings)
    shapes = {_shape_key(batch * t, m, n): (batch * t, m, n) for m, n, t in layers.values()}
    table_shapes: dict[str, dict] = {}
    folder = cache_dir()
    with tempfile.TemporaryDirectory(prefix="mixrank-latency-") as tmp:
        timer = _Timer(settings, Path(tmp), seconds)
        for key, (tokens, m, n) in tqdm(shapes.items(), desc="latency table", unit="shape", disable=not progress):
            grid = rank_grid(m, n)
            path = folder / f"{_cache_key(rec, tokens, m, n, tuple(computes), grid)}.json"
            entry = _read_cache(path) if cache else None
            if entry is None:
                entry = {"dense": {c: timer.product(tokens, n, m, c) for c in computes},
                         "in": {c: {str(r): timer.product(tokens, n, r, c) for r in grid} for c in computes},
                         "out": {c: {str(r): timer.product(tokens, r, m, c) for r in grid} for c in computes},
                         # a pair's cols layer gathers r input columns, a rows layer scatters r rows back to m
                         "gather": {"float": {str(r): timer.product(tokens, n, r, "gather") for r in grid}},
                         "scatter": {"float": {str(r): timer.product(tokens, r, m, "scatter") for r in grid}}}
                if cache:
                    try:
                        folder.mkdir(parents=True, exist_ok=True)
                        atomic_write_text(path, json_text(entry))
                    except OSError:
                        pass  # an unwritable cache only costs the next run the measurement
            table_shapes[key] = entry
        original_ms = _original_ms(engine, original_onnx, settings, batch, seq_len, original_seconds)
    return {"format": TABLE_FORMAT, "engine": rec, "batch": batch, "original_ms": round(original_ms, 5),
            "layers": {name: _shape_key(batch * t, m, n) for name, (m, n, t) in layers.items()},
            "shapes": table_shapes}


def _original_ms(engine: str, onnx_path, settings, batch: int, seq_len: int, seconds: float) -> float:
    if not Path(onnx_path).is_file():
        raise MixrankError(f"{onnx_path} does not exist")
    runner = make_runner(engine, onnx_path, settings)
    try:
        feeds = random_feeds(runner, batch, seq_len=seq_len)
        ms = _median_ms(lambda: runner.infer(feeds), seconds, least=7, most=200)
    finally:
        runner.close()
    if not math.isfinite(ms) or ms <= 0:
        raise MixrankError(f"timing {onnx_path} gave {ms} ms")
    return ms
