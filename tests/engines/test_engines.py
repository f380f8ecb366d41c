import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from exporter_helpers import build_graph, factors_from_weights, mlp

from mixrank.compress import MixrankError, save_factors
from mixrank.engines import (
    EXIT_LIMIT_FAILED,
    EXIT_NOT_MEASURED,
    EXIT_OK,
    NotInstalledError,
    OrtSettings,
    TimingConfig,
    build_report,
    check_report,
    junit_xml,
    load_limits,
    matmul_flops,
    measure,
    ort_session,
    write_report,
)
from mixrank.exporter import rewrite_onnx

FAST = TimingConfig(warmup=1, min_rounds=2, max_rounds=4, iters_per_round=2, max_seconds=5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    model = mlp([64, 256, 64, 10], 0)
    onnx.save(build_graph(model, ["matmul", "gemm_transb", "matmul"], [1.0] * 3, 8), str(d / "o.onnx"))
    f = factors_from_weights(model, ["0", "2"], rank=8)
    save_factors(f, d / "f.safetensors")
    rewrite_onnx(d / "o.onnx", f, d / "c.onnx")
    return d, model, f


def test_measure_and_report(pair, tmp_path):
    d, model, f = pair
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(-1).numpy()
    res = measure(d / "o.onnx", d / "c.onnx", batches=(8,), inputs=x, labels=labels,
                  timing=FAST, progress=False)
    fo, fc = res["footprint"]["original"], res["footprint"]["compressed"]
    assert fo["params"] == 64 * 256 + 256 + 256 * 64 + 64 + 64 * 10 + 10
    assert fc["params"] == fo["params"] - 2 * 64 * 256 + 8 * (64 + 256) * 2
    assert fc["initializer_bytes"] == 4 * fc["params"]
    assert fo["peak_rss_bytes"] > fo["baseline_rss_bytes"] > 0
    # FLOPs at batch 8: 2*8*(64*256 + 256*64 + 64*10) vs factored
    assert res["flops"]["original"]["8"] == 2 * 8 * (64 * 256 * 2 + 64 * 10)
    assert res["flops"]["compressed"]["8"] == 2 * 8 * (2 * 8 * (64 + 256) + 64 * 10)
    t = res["throughput"][0]
    assert t["batch"] == 8 and t["speedup"] > 0 and t["sessions"]["original"]["p99_ms"] > 0
    fid = res["fidelity"]
    assert fid["top1_original"] == 1.0 and 0 <= fid["top1_compressed"] <= 1
    rep = build_report(res, f.plan)
    paths = write_report(rep, tmp_path / "r")
    assert json.loads(paths["json"].read_text())["summary"]["param_ratio"] < 1
    assert "| parameters |" in paths["md"].read_text()
    assert paths["latency_png"].stat().st_size > 1000 and paths["layers_png"].is_file()


def test_flops_of_a_timm_export(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from mixrank.exporter import export_onnx

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                          num_classes=10).eval()
    export_onnx(m, torch.randn(1, 3, 32, 32), tmp_path / "v.onnx")
    t, d = 17, 64  # tokens, width
    linear = 2 * t * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)
    attention = 2 * 2 * t * t * d  # q@k and att@v over all heads
    patch = 2 * 16 * d * 3 * 8 * 8
    head = 2 * d * 10
    assert matmul_flops(tmp_path / "v.onnx", 1) == linear + attention + patch + head


def _report(**summary):
    return {"summary": summary}


def test_budget_and_gate(tmp_path):
    b = tmp_path / "b.toml"
    b.write_text("max_param_ratio = 0.5\nmin_speedup = { 32 = 1.2 }\nmin_top1_agreement = 0.9\n")
    limits = load_limits(b)
    ok = check_report(_report(param_ratio=0.4, speedup_b32=1.5, top1_agreement=0.95), limits)
    assert ok["exit_code"] == EXIT_OK
    bad = check_report(_report(param_ratio=0.6, speedup_b32=1.5, top1_agreement=0.95), limits)
    assert bad["exit_code"] == EXIT_LIMIT_FAILED
    missing = check_report(_report(param_ratio=0.4, speedup_b32=1.5), limits)
    assert missing["exit_code"] == EXIT_NOT_MEASURED
    root = ET.fromstring(junit_xml(bad))
    assert root.get("tests") == "3" and root.get("failures") == "1"
    assert root.find("testcase[@name='max_param_ratio']/failure") is not None


@pytest.mark.parametrize("text, match", [
    ("max_param_ratio = 0.5\nmax_params_ratio = 0.4\n", r"b\.toml:2: unknown key 'max_params_ratio'"),
    ("max_param_ratio = 'half'\n", r"b\.toml:1: max_param_ratio must be a number"),
    ("\nmin_speedup = 1.2\n", r"b\.toml:2: min_speedup must be a table"),
    ("min_speedup = { x = 1.2 }\n", r"batch size 'x' is not a positive integer"),
    ("max_param_ratio = = 1\n", r"not valid TOML.*line 1"),
    ("", "sets no limit"),
])
def test_budget_file_errors(tmp_path, text, match):
    b = tmp_path / "b.toml"
    b.write_text(text)
    with pytest.raises(MixrankError, match=match):
        load_limits(b)


def test_engine_not_installed_names_the_package(pair):
    import onnxruntime as ort

    d, _, _ = pair
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(NotInstalledError, match="onnxruntime-gpu"):
            ort_session(d / "o.onnx", OrtSettings(provider="cuda"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from mixrank.engines import build_engine

        with pytest.raises(NotInstalledError, match="'tensorrt' Python package"):
            build_engine(d / "c.onnx", d / "c.engine")
        assert not (d / "c.engine").exists()


def test_failed_build_leaves_nothing(tmp_path):
    from mixrank.engines import build_ort

    g = onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g), str(tmp_path / "bad.onnx"))
    with pytest.raises(MixrankError, match="onnxruntime cannot load"):
        build_ort(tmp_path / "bad.onnx", tmp_path / "out" / "bad.ort.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_ort_build_writes_engine_and_sidecar(pair, tmp_path):
    from mixrank.engines import build_ort

    d, _, _ = pair
    rec = build_ort(d / "c.onnx", tmp_path / "c.ort.onnx", OrtSettings(threads=1))
    assert (tmp_path / "c.ort.onnx").stat().st_size == rec["engine_bytes"]
    assert json.loads((tmp_path / "c.ort.onnx.json").read_text())["settings"]["threads"] == 1


@pytest.mark.tensorrt
def test_tensorrt_engine_keeps_two_gemms(pair, tmp_path):
    pytest.importorskip("tensorrt")
    from mixrank.engines import TrtSettings, build_engine, check_two_gemms

    d, _, f = pair
    rep = rewrite_onnx(d / "o.onnx", f, tmp_path / "c.onnx")
    side = build_engine(tmp_path / "c.onnx", tmp_path / "c.engine", TrtSettings(max_batch=8, opt_batch=8,
                                                                                 min_batch=8))
    assert (tmp_path / "c.engine").stat().st_size == side["engine_bytes"] > 0
    assert side["device_memory_bytes"] > 0
    findings = check_two_gemms(side, rep.rewritten)
    assert all(x["status"] != "not found in the inspector output" for x in findings)


def test_references_are_measured_beside_and_named_in_the_summary(pair, tmp_path):
    """onnxruntime's quantize_dynamic and weight-only int8/int4 of the original: the same
    logical parameters and FLOPs as the original, fewer bytes; the summary names the smallest
    and the fastest artifact and the speedup over the faster int8, which the gate reads."""
    from mixrank.exporter import REFERENCES, check_references, write_reference

    d, model, f = pair
    refs = {n: write_reference(n, d / "o.onnx", tmp_path / f"o.{n}.onnx") for n in REFERENCES}
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    res = measure(d / "o.onnx", d / "c.onnx", batches=(8,), inputs=x, timing=FAST, progress=False, references=refs)
    fp = res["footprint"]
    ops = {n: {nd.op_type for nd in onnx.load(str(p)).graph.node} for n, p in refs.items()}
    assert "MatMulInteger" in ops["int8_dynamic"] and "MatMulNBits" in ops["int4"]
    for n in REFERENCES:
        assert fp[n]["params"] == fp["original"]["params"], n
        assert fp[n]["file_bytes"] < 0.7 * fp["original"]["file_bytes"], n  # quantize_dynamic leaves Gemm alone
        assert res["flops"][n]["8"] == res["flops"]["original"]["8"], n
        assert res["reference_fidelity"][n]["cosine_mean"] > 0.99, n
    s = build_report(res)["summary"]
    names = ["original", "compressed", *REFERENCES]
    assert s["smallest"] == min(names, key=lambda n: fp[n]["file_bytes"])
    p50 = {n: v["p50_ms"] for n, v in res["throughput"][0]["sessions"].items()}
    assert s["fastest_b8"] == min(names, key=p50.get)
    assert s["speedup_vs_fastest_int8_b8"] == pytest.approx(min(p50["int8"], p50["int8_dynamic"]) / p50["compressed"])
    lim = tmp_path / "l.toml"
    lim.write_text(f"min_speedup_vs_int8 = {{ 8 = {s['speedup_vs_fastest_int8_b8'] * 0.99} }}\n")
    assert check_report({"summary": s}, load_limits(lim))["exit_code"] == EXIT_OK
    lim.write_text(f"min_speedup_vs_int8 = {{ 8 = {s['speedup_vs_fastest_int8_b8'] * 1.01} }}\n")
    assert check_report({"summary": s}, load_limits(lim))["exit_code"] == EXIT_LIMIT_FAILED
    assert check_references("int4,int8_dynamic") == ("int8_dynamic", "int4")
    with pytest.raises(MixrankError, match="unknown reference 'int3'"):
        check_references("int8,int3")
