"""Latency budgets: the table's reader refuses what is not one, the model of a choice's time
follows each form's products, and the allocators meet a latency budget beside the bytes
(docs/design.md, "Latency budgets"); the table is measured on onnxruntime for real."""

import json

import pytest

from mixrank.compress import MixrankError
from mixrank.compress.allocate import (
    LatencyBudget,
    LatencyTable,
    LayerSpace,
    Option,
    layer_spaces,
    parse_latency,
    propose,
    uniform_allocation,
    uniform_within,
)

GRID = {"8": 1.0, "16": 2.0, "32": 4.0, "64": 8.0}


def _table(layers=("a", "b"), original=100.0, dense=30.0, dynamic=False):
    computes = ("float", "dynamic") if dynamic else ("float",)
    shape = {"dense": {c: dense / (2 if c == "dynamic" else 1) for c in computes},
             "in": {c: dict(GRID) for c in computes}, "out": {c: dict(GRID) for c in computes},
             "gather": {"float": dict(GRID)}, "scatter": {"float": dict(GRID)}}
    return LatencyTable.from_dict({"format": "mixrank latency table 1", "engine": {"engine": "onnxruntime"},
                                   "batch": 32, "original_ms": original, "layers": {n: "64x64x64" for n in layers},
                                   "shapes": {"64x64x64": shape}})


@pytest.mark.parametrize("text,want", [("0.5x", ("x", 0.5)), ("12ms", ("ms", 12.0)), (" 3.5 MS ", ("ms", 3.5))])
def test_parse_latency(text, want):
    assert parse_latency(text) == want


@pytest.mark.parametrize("text", ["0.5", "1.2x", "0x", "-3ms", "fast", "nanms", ""])
def test_parse_latency_refuses(text):
    with pytest.raises(MixrankError, match="--latency"):
        parse_latency(text)


def test_a_table_that_is_not_one_is_refused():
    good = _table().to_dict()
    for bad in ({}, {**good, "format": "x"}, {**good, "original_ms": -1}, {**good, "shapes": {}},
                {**good, "layers": {"a": "nope"}}, {**good, "batch": "many"}):
        with pytest.raises(MixrankError, match="latency table"):
            LatencyTable.from_dict(json.loads(json.dumps(bad)))


def test_each_form_costs_its_products():
    t = _table()
    b = LatencyBudget.of(t, "0.5x")
    assert b.limit_ms == 50.0 and b.rest_ms == 100.0 - 2 * 30.0
    sp = LayerSpace("a", 64, 64, 8, 32)
    assert b.layer_ms(sp, None) == 30.0
    assert b.layer_ms(sp, 16) == 2.0 + 2.0  # x B then A
    assert b.layer_ms(sp, 24) == pytest.approx(3.0 + 3.0)  # interpolated between 16 and 32
    res = LayerSpace("a", 64, 64, 8, 32, form="residual", precision="fp16", residual_precision="int2")
    assert b.layer_ms(res, 8) == 1.0 + 1.0 + 30.0  # and the dense residual
    assert b.layer_ms(LayerSpace("a", 64, 64, 8, 32, form="rows"), 16) == 2.0 + 2.0  # and its scatter
    dyn = LatencyBudget.of(_table(dynamic=True), "0.5x", compute="dynamic")
    assert dyn.layer_ms(LayerSpace("a", 64, 64, 8, 32, precision="int8"), None) == 15.0
    assert dyn.layer_ms(LayerSpace("a", 64, 64, 8, 32, precision="int4"), None) == 30.0  # int4 runs in float
    with pytest.raises(MixrankError, match="no layer"):
        b.layer_ms(LayerSpace("zzz", 64, 64, 8, 32), None)


def test_the_uniform_start_meets_the_latency_budget():
    spaces = layer_spaces({"a": (64, 64), "b": (64, 64)}, 8, 8, {})
    budget = sum(sp.cost(None) for sp in spaces.values()) - 1
    free = uniform_allocation(spaces, budget, 8)
    lat = LatencyBudget.of(_table(), "48ms")  # rest 40 ms: the two layers get 8 ms
    assert not lat.within(spaces, free)
    a = uniform_within(spaces, budget, 8, lat)
    assert lat.within(spaces, a) and sum(sp.cost(a[n]) for n, sp in spaces.items()) <= budget
    assert lat.predict(spaces, a) > 40.0 + 2 * 2.0  # it took the largest ranks that fit, not the smallest
    with pytest.raises(MixrankError, match="latency budget"):
        uniform_within(spaces, budget, 8, LatencyBudget.of(_table(), "40.5ms"))


def test_the_proposal_meets_both_budgets():
    sp = LayerSpace("a", 8, 8, 8, 8)
    opts = {n: [Option(sp, None, 10, 1.0, "cheap slow", latency=5.0),
                Option(sp, None, 20, 0.1, "big slow", latency=5.0),
                Option(sp, None, 20, 0.5, "big fast", latency=1.0)] for n in "ab"}
    free = propose(opts, {"a": 1.0, "b": 1.0}, 40)
    assert {o.label for o in free.options.values()} == {"big slow"}
    fast = propose(opts, {"a": 1.0, "b": 1.0}, 40, limit=6.0)
    assert fast.cost <= 40 and fast.latency <= 6.0
    assert sorted(o.label for o in fast.options.values()) == ["big fast", "big slow"]
    assert propose(opts, {"a": 1.0, "b": 1.0}, 40, limit=1.5) is None


def test_the_table_is_measured_on_onnxruntime_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnx
    from exporter_helpers import build_graph, mlp

    from mixrank.engines import OrtSettings, latency_table

    monkeypatch.setenv("MIXRANK_CACHE_DIR", str(tmp_path / "cache"))
    model = mlp([64, 128, 10], 0)
    onnx.save(build_graph(model, ["matmul", "matmul"], [1.0] * 2, 8), str(tmp_path / "o.onnx"))
    layers = {"0": (128, 64, 1), "2": (10, 128, 1)}
    d = latency_table(tmp_path / "o.onnx", layers, 8, OrtSettings(threads=1), seconds=0.02,
                      original_seconds=0.1, progress=False)
    t = LatencyTable.from_dict(d)
    assert t.batch == 8 and t.layers == {"0": "8x128x64", "2": "8x10x128"} and t.original_ms > 0
    assert set(t.shapes["8x128x64"]["in"]["float"]) >= {8, 16, 32, 64}
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 2
    again = latency_table(tmp_path / "o.onnx", layers, 8, OrtSettings(threads=1), seconds=0.02,
                          original_seconds=0.1, progress=False)
    assert again["shapes"] == d["shapes"]  # read back from the cache, not measured again
    with pytest.raises(MixrankError, match="onnxruntime"):
        latency_table(tmp_path / "o.onnx", layers, 8, None, engine="tensorrt")


@pytest.mark.parametrize("kw,match", [({"latency": "0.5"}, "--latency"),
                                      ({"latency": "0.5x", "int_weights": "packed"}, "packed"),
                                      ({"latency": "0.5x", "latency_batch": 0}, "latency-batch")])
def test_the_main_job_refuses_a_latency_budget_it_cannot_meet_before_any_work(kw, match):
    from mixrank._pipeline import RunOptions
    from mixrank._target import Target

    with pytest.raises(MixrankError, match=match):
        RunOptions(**kw).check()
    with pytest.raises(MixrankError, match="onnxruntime"):
        RunOptions(latency="0.5x", target=Target(engine="tensorrt")).check()
    RunOptions(latency="0.5x").check()  # a good one passes


@pytest.mark.parametrize("compute", ["float", "dynamic"])
def test_the_profile_times_each_product_by_its_own_kernels(tmp_path, compute):
    """Products timed in one session from onnxruntime's profile: each gets its own kernels'
    time (a 32x larger product takes longer, two copies of one agree), none is left at zero."""
    pytest.importorskip("onnxruntime")
    from mixrank.engines import OrtSettings
    from mixrank.engines._latency import _Timer

    timer = _Timer(OrtSettings(threads=1), tmp_path, seconds=0.05)
    big, small, again = timer.products(2048, [(256, 256), (256, 8), (256, 256)], compute)
    assert big > 4 * small > 0 and 0.5 < big / again < 2.0
    gather, scatter = timer.products(2048, [(256, 64), (64, 256)], "scatter")
    assert gather > 0 and scatter > 0


def test_two_passes_keep_each_products_faster_time():
    from mixrank.engines._latency import _fastest

    a = {"dense": {"float": 3.0}, "in": {"float": {"8": 1.0, "16": 2.5}}}
    b = {"dense": {"float": 2.0}, "in": {"float": {"8": 1.5, "16": 2.0}}}
    assert _fastest([a, b]) == {"dense": {"float": 2.0}, "in": {"float": {"8": 1.0, "16": 2.0}}}
