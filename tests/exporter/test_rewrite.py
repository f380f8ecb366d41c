"""The rewriter on hand-built graphs: every MatMul/Gemm form, matching rules, bad input."""

import numpy as np
import onnx
import pytest
import torch
from exporter_helpers import build_graph, factors_from_weights, mlp, rename_initializers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model, save_factors
from mixrank.exporter import (
    export_onnx,
    load_onnx,
    model_bytes,
    rewrite_onnx,
    run_onnxruntime,
    save_onnx,
    verify_rewrite,
)

FORMS = ("matmul", "matmul_add", "transpose", "gemm_transb", "gemm", "gemm_transa", "constant")


graphs = st.fixed_dictionaries({
    "dims": st.lists(st.integers(2, 24), min_size=2, max_size=5),
    "seed": st.integers(0, 10_000),
    "batch": st.integers(1, 4),
    "forms": st.lists(st.sampled_from(FORMS), min_size=4, max_size=4),
    "alphas": st.lists(st.sampled_from([1.0, 0.5, 2.0]), min_size=4, max_size=4),
})


def _run(tmp_path, spec, rank, sparse="none", k=0):
    model = mlp(spec["dims"], spec["seed"])
    n_lin = len(spec["dims"]) - 1
    proto = build_graph(model, spec["forms"][:n_lin], spec["alphas"][:n_lin], spec["batch"])
    src, out = tmp_path / "g.onnx", tmp_path / "r.onnx"
    onnx.save(proto, str(src))
    names = [str(i) for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
    factors = factors_from_weights(model, names, rank=rank, sparse=sparse, k=k)
    rep = rewrite_onnx(src, factors, out)
    assert sorted(r["layer"] for r in rep.rewritten) == sorted(names)
    x = torch.randn(spec["batch"], spec["dims"][0], generator=torch.Generator().manual_seed(1))
    got = run_onnxruntime(out, {"x": x.numpy()})[0]
    return model, factors, x, got


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=graphs)
def test_exact_factors_preserve_outputs(tmp_path, spec):
    model, _, x, got = _run(tmp_path, spec, rank=None)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=graphs, rank=st.integers(1, 6), sparse=st.sampled_from(["none", "channel", "row"]))
def test_truncated_factors_match_the_pytorch_reference(tmp_path, spec, rank, sparse):
    k = 0 if sparse == "none" else min(2, min(spec["dims"][:-1]))
    model, factors, x, got = _run(tmp_path, spec, rank=rank, sparse=sparse, k=k)
    with torch.no_grad():
        ref = apply_factors(model, factors)(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def digits_artifacts(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("digits")
    x = digits["xtr"][:256]
    f = compress_model(digits["model"], [x[i:i + 64] for i in range(0, 256, 64)],
                       CompressConfig(keep=0.4, search_evals=40, sparse="channel", overrides={
                           "blocks.1.mlp.fc1": {"sparse_k": 5}}), progress=False)
    save_factors(f, d / "f.safetensors")
    export_onnx(digits["model"], digits["xte"][:2], d / "orig.onnx")
    return d, f


@pytest.mark.slow
def test_initializer_bytes_match_the_plan_exactly(digits_artifacts, digits):
    d, f = digits_artifacts
    rewrite_onnx(d / "orig.onnx", d / "f.safetensors", d / "comp.onnx")
    before = model_bytes(onnx.load(str(d / "orig.onnx")))
    after = model_bytes(onnx.load(str(d / "comp.onnx")))
    t = f.plan["totals"]
    assert after == before - t["bytes_before"] + t["bytes_after"]
    assert f.layers["blocks.1.mlp.fc1"]["sparse"]["k"] == 5
    rep = verify_rewrite(d / "comp.onnx", digits["model"], f, digits["xte"][:64])
    assert rep["outputs"]["output"]["cosine"] > 0.99999


@pytest.mark.slow
def test_fingerprint_matching_after_renaming(digits_artifacts, digits, tmp_path):
    d, f = digits_artifacts
    rename_initializers(d / "orig.onnx", tmp_path / "renamed.onnx")
    rep = rewrite_onnx(tmp_path / "renamed.onnx", f, tmp_path / "comp.onnx")
    assert len(rep.rewritten) == len(f.factored_layers())
    assert all(r["matched_by"] == "fingerprint" for r in rep.rewritten)
    verify_rewrite(tmp_path / "comp.onnx", digits["model"], f, digits["xte"][:32])


def test_name_matching_and_dense_report(tmp_path):
    model = mlp([8, 16, 4], 0)
    torch.onnx.export(model, (torch.randn(2, 8),), str(tmp_path / "m.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"])
    f = factors_from_weights(model, ["0"], rank=3)
    rep = rewrite_onnx(tmp_path / "m.onnx", f, tmp_path / "r.onnx")
    assert [r["matched_by"] for r in rep.rewritten] == ["name"]  # Gemm keeps "0.weight"
    assert [d["weight"] for d in rep.dense] == ["2.weight"]


def test_partial_and_ambiguous_matches(tmp_path):
    model = mlp([8, 8, 8], 0)
    onnx.save(build_graph(model, ["matmul", "matmul"], [1, 1], 2), str(tmp_path / "g.onnx"))
    other = mlp([8, 8, 8, 8], 5)
    f = factors_from_weights(model, ["0", "2"])
    f.layers["4"] = {**f.layers["2"], "sha256": "0" * 64}
    f.tensors["4.A"], f.tensors["4.B"] = f.tensors["2.A"], f.tensors["2.B"]
    with pytest.raises(MixrankError, match=r"1 factored layer\(s\) match no MatMul.*4"):
        rewrite_onnx(tmp_path / "g.onnx", f, tmp_path / "r.onnx")
    assert not (tmp_path / "r.onnx").exists()
    rep = rewrite_onnx(tmp_path / "g.onnx", f, tmp_path / "r.onnx", allow_partial=True)
    assert rep.unmatched_factors == ["4"] and len(rep.rewritten) == 2
    with torch.no_grad():
        model[2].weight.copy_(model[0].weight)
    onnx.save(build_graph(model, ["matmul", "matmul"], [1, 1], 2), str(tmp_path / "twin.onnx"))
    f2 = factors_from_weights(model, ["0", "2"])
    with pytest.raises(MixrankError, match="matches several factored layers"):
        rewrite_onnx(tmp_path / "twin.onnx", f2, tmp_path / "r2.onnx")
    f3 = factors_from_weights(other, ["0", "2", "4"])
    with pytest.raises(MixrankError, match="match no MatMul"):  # another model's factors
        rewrite_onnx(tmp_path / "g.onnx", f3, tmp_path / "r3.onnx")
    assert not (tmp_path / "r3.onnx").exists()


def test_bad_onnx_files(tmp_path):
    model = mlp([8, 8], 0)
    f = factors_from_weights(model, ["0"])
    (tmp_path / "text.onnx").write_text("hello, I am not a model")
    onnx.save(build_graph(model, ["matmul"], [1], 2), str(tmp_path / "ok.onnx"))
    raw = (tmp_path / "ok.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(raw[: len(raw) // 2])
    for bad, msg in (("text.onnx", "not a readable ONNX model|not an ONNX model"),
                     ("trunc.onnx", "not a readable ONNX model|not an ONNX model"),
                     ("missing.onnx", "does not exist")):
        with pytest.raises(MixrankError, match=msg):
            rewrite_onnx(tmp_path / bad, f, tmp_path / "out.onnx")
        assert not (tmp_path / "out.onnx").exists()


def test_external_data_round_trip_and_missing_data(tmp_path):
    model = mlp([16, 16, 4], 0)
    proto = build_graph(model, ["matmul", "gemm"], [1, 1], 2)
    save_onnx(proto, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    f = factors_from_weights(model, ["0", "2"], rank=2)
    rewrite_onnx(tmp_path / "ext.onnx", f, tmp_path / "r.onnx", external_data=True)
    assert (tmp_path / "r.onnx.data").is_file()
    x = torch.randn(2, 16)
    got = run_onnxruntime(tmp_path / "r.onnx", {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, apply_factors(model, f)(x).numpy(), rtol=1e-4, atol=1e-5)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(MixrankError, match="external data file.*missing"):
        load_onnx(tmp_path / "ext.onnx")


def test_polygraphy_comparison_of_original_and_compressed(tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc, DataLoader

    model = mlp([12, 24, 6], 0)
    onnx.save(build_graph(model, ["matmul", "gemm_transb"], [1, 1], 3), str(tmp_path / "o.onnx"))
    rewrite_onnx(tmp_path / "o.onnx", factors_from_weights(model, ["0", "2"]), tmp_path / "c.onnx")
    loader = DataLoader(iterations=3, seed=0)
    results = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(tmp_path / "o.onnx")), name="orig"),
                              OnnxrtRunner(SessionFromOnnx(str(tmp_path / "c.onnx")), name="comp")],
                             data_loader=loader)
    ok = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=1e-4, rtol=1e-4))
    assert bool(ok)


@pytest.mark.slow
def test_fp16_graph_gets_fp16_factors(digits_artifacts, digits, tmp_path):
    d, f = digits_artifacts
    export_onnx(digits["model"], digits["xte"][:2], tmp_path / "o16.onnx", fp16=True,
                check_inputs=digits["xte"][:32])
    rep = rewrite_onnx(tmp_path / "o16.onnx", f, tmp_path / "c16.onnx")
    assert len(rep.rewritten) == len(f.factored_layers())
    proto = onnx.load(str(tmp_path / "c16.onnx"))
    factor_inits = [t for t in proto.graph.initializer if t.name.endswith(("A_t/0", "B_t/0"))
                    or ".A_t" in t.name or ".B_t" in t.name]
    assert factor_inits and all(t.data_type == TensorProto.FLOAT16 for t in factor_inits)
    rep = verify_rewrite(tmp_path / "c16.onnx", digits["model"], f, digits["xte"][:64])
    assert rep["outputs"]["output"]["cosine"] > 0.999
