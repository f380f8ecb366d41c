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
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mixrank.core import MixrankError, atomic_write_text, import_onnxruntime, json_text

from .runners import SEQ_LEN, make_runner, random_feeds

CACHE_VERSION = 5
REPEATS = 2


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


def _products_graph(path: Path, products: list[tuple[int, int]], compute: str, seed: int) -> None:
    """A graph of independent products, each ``(k, j)``: ``y_i = x_i W_i`` (x_i (T, k), W_i
    (k, j)) as the rewriter emits them — ``MatMul`` with float32 weights, or dynamic int8
    (`mixrank.exporter` ``_dynamic_matmul``'s pattern: ``DynamicQuantizeLinear`` →
    ``MatMulInteger`` → ``Cast`` → ``Mul``) — or, for ``gather``, ``j`` of the ``k`` columns of
    x_i (a pair's ``cols`` layer reading its input) and, for ``scatter``, that times a mask (a
    ``rows`` layer scattering its k computed rows back to j).

    Each product reads its own copy of the input, ``x_i = x_k · s_i``, written just before
    it, as a layer reads what the op before it has just written (and distinct, so that
    onnxruntime does not merge the dynamic quantizations of one input). Nodes are named
    ``p{i}|…`` for product i and ``prep|{i}`` for its input's copy."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    widths = sorted({k for k, _ in products})
    xs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [None, k]) for k in widths]
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, j]) for i, (_, j) in enumerate(products)]
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op, ins, outs, name, **kw):
        nodes.append(helper.make_node(op, ins, outs, name=name, **kw))

    for i, (k, j) in enumerate(products):
        x = f"x_{i}"
        node("Mul", [f"x{k}", const(f"s{i}", np.array(1.0 + 1e-3 * i, np.float32))], [x], f"prep|{i}")
        if compute == "float":
            node("MatMul", [x, const(f"w{i}", (rng.standard_normal((k, j)) * 0.05).astype(np.float32))],
                 [f"y{i}"], f"p{i}|matmul")
        elif compute == "dynamic":
            wq = const(f"wq{i}", rng.integers(-127, 128, (k, j)).astype(np.int8))
            wz, ws = const(f"wz{i}", np.zeros(j, np.int8)), const(f"ws{i}", np.full(j, 1e-3, np.float32))
            node("DynamicQuantizeLinear", [x], [f"xq{i}", f"xs{i}", f"xz{i}"], f"p{i}|quantize")
            node("MatMulInteger", [f"xq{i}", wq, f"xz{i}", wz], [f"acc{i}"], f"p{i}|matmul")
            node("Cast", [f"acc{i}"], [f"accf{i}"], f"p{i}|cast", to=TensorProto.FLOAT)
            node("Mul", [f"xs{i}", ws], [f"sc{i}"], f"p{i}|scale")
            node("Mul", [f"accf{i}", f"sc{i}"], [f"y{i}"], f"p{i}|rescale")
        else:  # gather, scatter
            idx = const(f"idx{i}", rng.integers(0, k, j).astype(np.int64))
            g = f"g{i}" if compute == "scatter" else f"y{i}"
            node("Gather", [x, idx], [g], f"p{i}|gather", axis=-1)
            if compute == "scatter":
                node("Mul", [g, const(f"mask{i}", (rng.random(j) < 0.5).astype(np.float32))], [f"y{i}"], f"p{i}|mask")
    model = helper.make_model(helper.make_graph(nodes, "products", xs, ys, inits),
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
    """Times products on onnxruntime as they run inside a graph: the inputs and outputs
    bound in place (``io_binding``: no copy in or out), each product reading an input just
    written (`_products_graph`).

    On the CPU, from onnxruntime's profile: the median over runs of each product's kernels'
    time, all of one curve's products in one session (the weights of the others pass through
    the caches between them, as a model's do). So neither the call's own cost nor the thread
    pool's wake-up enters, and nothing is differenced: repeated, a shape's products agree to a
    few per cent, where the difference of two wall-clock timings (a graph of three copies less
    one) scattered by ±30 % from one session to the next on a 2-core machine. On another
    provider, whose kernels run asynchronously to the profile, that wall-clock difference is
    what is used (it includes the input's copy)."""

    COPIES = 3
    WARMUP = 2

    def __init__(self, settings, folder: Path, seconds: float):
        self.settings, self.folder, self.seconds = settings, folder, seconds
        self.count = 0
        self.device = "cpu" if settings.provider == "cpu" else "cuda"

    def _session(self, tokens: int, products: list[tuple[int, int]], compute: str, profile: bool):
        from .runners import ort_session

        ort = import_onnxruntime()
        self.count += 1
        path = self.folder / f"products{self.count}.onnx"
        _products_graph(path, products, compute, self.count)
        prefix = str(self.folder / f"profile{self.count}") if profile else None
        sess = ort_session(path, self.settings, profile=prefix)
        path.unlink()
        binding = sess.io_binding()
        rng = np.random.default_rng(self.count)
        for k in sorted({k for k, _ in products}):
            x = rng.standard_normal((tokens, k)).astype(np.float32)
            binding.bind_ortvalue_input(f"x{k}", ort.OrtValue.ortvalue_from_numpy(x, self.device, 0))
        for i, (_, j) in enumerate(products):
            binding.bind_ortvalue_output(f"y{i}", ort.OrtValue.ortvalue_from_shape_and_type(
                [tokens, j], np.float32, self.device, 0))

        def run():
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return sess, run

    def products(self, tokens: int, products: list[tuple[int, int]], compute: str) -> list[float]:
        """Each product's time (ms) at ``tokens`` rows, for ``compute`` (`_products_graph`)."""
        if self.device != "cpu":
            return [self._differenced(tokens, p, compute) for p in products]
        sess, run = self._session(tokens, products, compute, profile=True)
        _median_ms(run, self.seconds, warmup=self.WARMUP, least=7, most=41)
        profile = Path(sess.end_profiling())
        try:
            events = json.loads(profile.read_text())
        finally:
            profile.unlink(missing_ok=True)
        runs: dict[tuple[int, str], list[float]] = {}
        for e in events:
            name = e.get("name", "")
            node = re.fullmatch(r"p(\d+)\|(.+)_kernel_time", name)
            if e.get("cat") == "Node" and node:
                runs.setdefault((int(node.group(1)), node.group(2)), []).append(e["dur"] / 1e3)
        ms = [0.0] * len(products)
        for (i, _), times in runs.items():
            ms[i] += statistics.median(times[self.WARMUP:] or times)
        if not all(ms):
            raise MixrankError(f"onnxruntime's profile has no kernel time for {products[ms.index(0.0)]}")
        return [round(max(t, 1e-4), 5) for t in ms]

    def _differenced(self, tokens: int, product: tuple[int, int], compute: str) -> float:
        times = []
        for copies in (1, self.COPIES):
            _, run = self._session(tokens, [product] * copies, compute, profile=False)
            times.append(_median_ms(run, self.seconds))
        return round(max((times[1] - times[0]) / (self.COPIES - 1), 1e-4), 5)


def _measure_shape(timer: _Timer, tokens: int, m: int, n: int, grid: list[int], computes) -> dict:
    """A shape's entry of the table: the dense product, the factors' first (``in``) and second
    (``out``) products at each rank of ``grid`` per compute, and a pair's gather and scatter."""

    def curve(products, compute):
        return dict(zip(map(str, grid), timer.products(tokens, products, compute), strict=True))

    entry: dict = {"dense": {}, "in": {}, "out": {}}
    for c in computes:
        # the dense product in the session of the ranks' first products: all read the layer's input
        first = timer.products(tokens, [(n, m)] + [(n, r) for r in grid], c)
        entry["dense"][c] = first[0]
        entry["in"][c] = dict(zip(map(str, grid), first[1:], strict=True))
        entry["out"][c] = curve([(r, m) for r in grid], c)
    # a pair's cols layer gathers r input columns, a rows layer scatters r rows back to m
    entry["gather"] = {"float": curve([(n, r) for r in grid], "gather")}
    entry["scatter"] = {"float": curve([(r, m) for r in grid], "scatter")}
    return entry


def _fastest(entries: list[dict]) -> dict:
    """Entries of one shape merged, each time the least of theirs."""
    def least(*xs):
        if isinstance(xs[0], dict):
            return {k: least(*(x[k] for x in xs)) for k in xs[0]}
        return min(xs)

    return least(*entries)


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
        seconds: the timing of each curve's products (median of at least 7 runs).
        original_seconds: the timing of the original (timed before and after the products,
            the faster kept, as each shape's products are: measured twice, the least kept).
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
    paths = {key: folder / f"{_cache_key(rec, tokens, m, n, tuple(computes), rank_grid(m, n))}.json"
             for key, (tokens, m, n) in shapes.items()}
    for key, path in paths.items():
        entry = _read_cache(path) if cache else None
        if entry is not None:
            table_shapes[key] = entry
    todo = [key for key in shapes if key not in table_shapes]
    with tempfile.TemporaryDirectory(prefix="mixrank-latency-") as tmp:
        timer = _Timer(settings, Path(tmp), seconds)
        original = [_original_ms(engine, original_onnx, settings, batch, seq_len, original_seconds)]
        # every shape measured twice, one pass after the other, and the faster of the two kept:
        # what another process takes from a 2-core machine only ever slows a measurement
        steps = [(key, p) for p in range(REPEATS) for key in todo]
        measured: dict[str, list[dict]] = {}
        for key, _ in tqdm(steps, desc="latency table", unit="shape", disable=not progress):
            tokens, m, n = shapes[key]
            measured.setdefault(key, []).append(_measure_shape(timer, tokens, m, n, rank_grid(m, n), computes))
        for key, entries in measured.items():
            entry = _fastest(entries)
            table_shapes[key] = entry
            if cache:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(paths[key], json_text(entry))
                except OSError:
                    pass  # an unwritable cache only costs the next run the measurement
        original.append(_original_ms(engine, original_onnx, settings, batch, seq_len, original_seconds))
        original_ms = min(original)
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
