"""Precision: the stored integer weights are read back by onnxruntime exactly as the
PyTorch simulation reads them, the byte accounting is the bytes in the file, GPTQ beats
round-to-nearest on the output error, and quantized plans export and run."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model
from mixrank.compress.store import quantize, storage_bytes
from mixrank.exporter import export_onnx, rewrite_onnx
from mixrank.exporter._qlinear import project


def _graph_of(build, k, n, opset):
    """A one-projection graph ``y = x Wᵀ`` from `project`'s nodes."""
    import onnx_graphsurgeon as gs

    x = gs.Variable("x", dtype=np.float32, shape=["b", k])
    y = gs.Variable("y", dtype=np.float32, shape=["b", n])
    g = gs.Graph(nodes=build(x, y), inputs=[x], outputs=[y], opset=opset)
    model = gs.export_onnx(g.cleanup().toposort())
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _run(model, x, optimize=True):
    so = ort.SessionOptions()
    if not optimize:  # onnxruntime would fuse DequantizeLinear + MatMul into its own int8 kernel
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


FORMS = [("onnxruntime", False, "packed"), ("onnxruntime", True, "packed"), ("onnxruntime", False, "expanded"),
         ("onnxruntime", True, "expanded"), ("tensorrt", True, "packed")]  # TensorRT: symmetric only


@pytest.mark.parametrize("precision", ["int8", "int4", "int2"])
@pytest.mark.parametrize("k, block", [(48, 32), (40, 16), (128, 64)])
@pytest.mark.parametrize("target, symmetric, weights", FORMS)
def test_the_engine_reads_back_exactly_what_pytorch_simulates(precision, k, block, target, symmetric, weights,
                                                              tmp_path):
    if target == "tensorrt" and precision == "int2":
        pytest.skip("TensorRT dequantizes INT8 and INT4 only")
    n = 24
    bits = {"int8": 8, "int4": 4, "int2": 2}[precision]
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(k + block))
    q = quantize(W, bits, block, symmetric=symmetric)
    tensors = {"l.W.codes": q.codes, "l.W.scale": q.scale, "l.W.zero_point": q.zero_point}
    model = _graph_of(lambda x, y: project(x, tensors, "l.W", k, n, precision, np.float32, "mm",
                                           lambda w: f"l.{w}", y, target, weights), k, n,
                      21 if target == "tensorrt" else 17)
    onnx.checker.check_model(model)
    eye = np.eye(k, dtype=np.float32)
    got = _run(model, eye, optimize=target == "onnxruntime")  # I @ Wᵀ = Wᵀ, read back by the engine
    np.testing.assert_array_equal(got, q.dequantize().numpy().T)
    if weights == "expanded":  # unoptimised, the subgraph computes the same bits; optimised, it is folded away
        np.testing.assert_array_equal(_run(model, eye, optimize=False), got)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        assert [nd.op_type for nd in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["MatMul"]
    # and what the file holds is what the byte accounting says (the expanded form's scalars and shapes aside)
    nbytes = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                 if weights == "packed" or len(t.dims) >= 2)
    expected = storage_bytes(n, k, precision, block, symmetric)
    if target == "tensorrt":  # unpadded codes and no zero points
        expected = -(-n * k * bits // 8) + 4 * n * -(-k // block)
    assert nbytes == expected


def test_tensorrt_refuses_zero_points():
    q = quantize(torch.randn(8, 32), 8, 32)
    tensors = {"l.W.codes": q.codes, "l.W.scale": q.scale, "l.W.zero_point": q.zero_point}
    with pytest.raises(MixrankError, match="symmetric"):
        _graph_of(lambda x, y: project(x, tensors, "l.W", 32, 8, "int8", np.float32, "mm", lambda w: w, y,
                                       "tensorrt"), 32, 8, 21)


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_lowers_the_output_error(bits):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g)
    X = (torch.randn(800, 96, generator=g) @ torch.randn(96, 96, generator=g)) * torch.linspace(3, 0.1, 96)
    H = X.T.double() @ X.double()

    def err(Wq):
        E = W.double() - Wq.double()
        return float(torch.einsum("ij,jk,ik->", E, H, E) / torch.einsum("ij,jk,ik->", W.double(), H, W.double()))

    rtn, gptq = quantize(W, bits, 32).dequantize(), quantize(W, bits, 32, H).dequantize()
    assert err(gptq) < 0.6 * err(rtn), (err(gptq), err(rtn))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2,
                              num_heads=2).eval()
    d = tmp_path_factory.mktemp("q")
    calib = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    export_onnx(model, calib[0][:2], d / "o.onnx")
    return model, calib, d


FAST = {"search_evals": 12, "compensate_steps": 10, "block_steps": 10, "distill_steps": 10}


@pytest.mark.parametrize("precision, scheme, target", [
    ("fp16", "asymmetric", "onnxruntime"), ("int8", "asymmetric", "onnxruntime"),
    ("int4", "asymmetric", "onnxruntime"), ("int4", "symmetric", "tensorrt"), ("int8", "symmetric", "tensorrt"),
])
def test_quantized_factors_export_and_match_the_simulation(exported, precision, scheme, target):
    model, calib, d = exported
    f = compress_model(model, calib, CompressConfig(keep=0.5, precision=precision, scheme=scheme, **FAST),
                       progress=False)
    assert {i.precision for i in f.layers.values()} == {precision}
    out = d / f"c_{precision}_{target}.onnx"
    rep = rewrite_onnx(d / "o.onnx", f, out, target=target)
    assert len(rep.rewritten) == len(f.factored_layers())
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = apply_factors(model, f)(x).numpy()
    so = ort.SessionOptions()
    if target == "tensorrt":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("MatMulNBits" in ops) == (precision.startswith("int") and target == "onnxruntime")
    assert ("DequantizeLinear" in ops) == (target == "tensorrt")


def test_the_byte_budget_counts_what_the_file_holds(exported):
    model, calib, d = exported
    from mixrank.exporter import model_bytes

    f = compress_model(model, calib, CompressConfig(bytes=40_000, precision="int4", **FAST), progress=False)
    t = f.plan.totals
    assert t.cost <= f.plan.budget.budget == 40_000 and t.bytes_after == t.cost
    rewrite_onnx(d / "o.onnx", f, d / "b.onnx")
    before, after = model_bytes(onnx.load(str(d / "o.onnx"))), model_bytes(onnx.load(str(d / "b.onnx")))
    assert after == before - t.bytes_before + t.bytes_after


@pytest.mark.parametrize("fraction, alone, factored", [
    (0.35, ("dense int8 (quantization alone)", "dense int4 (quantization alone)"), ("uniform fp16",)),
    (0.2, ("dense int4 (quantization alone)",), ("uniform fp16", "uniform int8")),
])
def test_auto_precision_is_never_worse_than_quantization_alone(exported, fraction, alone, factored):
    """Every way of storing the layers that fits the bytes is a candidate, quantization
    alone included (dense int8 fits above ~0.29x of the float32 bytes, int4 above ~0.16x),
    and the held-out score of what ships is no worse than any of them."""
    model, calib, _ = exported
    sel = 4 * sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("blocks.")
                  and isinstance(m, torch.nn.Linear))
    f = compress_model(model, calib, CompressConfig(bytes=int(fraction * sel), precision="auto", **FAST),
                       progress=False)
    scores = {c["name"]: c["score"] for c in f.plan.allocation.candidates}
    assert set(alone) | set(factored) <= set(scores), sorted(scores)
    assert f.plan.allocation.refinement.score <= min(scores[a] for a in alone) * (1 + 1e-9)
    assert f.plan.totals.cost <= f.plan.budget.budget


@pytest.mark.parametrize("kwargs, match", [
    ({"keep": 0.4, "precision": "auto"}, "bytes budget"),
    ({"bytes": "1.5x"}, r"fraction in \(0, 1\)"),
    ({"precision": "int3"}, "unknown precision"),
    ({"precision": "int8", "sparse": "row"}, "sparse term is stored in floating point"),
    ({"block": 48}, "block must be one of"),
])
def test_precision_settings_are_checked(kwargs, match):
    with pytest.raises(MixrankError, match=match):
        CompressConfig(**kwargs)


@pytest.mark.parametrize("k, block", [(48, 32), (200, 64), (256, 128)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int2_is_read_back_by_onnxruntime_bit_for_bit(k, block, symmetric):
    """int2 codes (four to a byte) and their zero points (four to a byte) as
    ``MatMulNBits`` bits=2: onnxruntime reads back exactly the PyTorch simulation, and the
    file holds exactly the bytes the accounting says; TensorRT's form refuses int2."""
    n = 20
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    q = quantize(W, 2, block, symmetric=symmetric)
    assert int(q.codes.max()) <= 3 and bool((q.dequantize() != 0).any())
    tensors = {"l.W.codes": q.codes, "l.W.scale": q.scale, "l.W.zero_point": q.zero_point}
    model = _graph_of(lambda x, y: project(x, tensors, "l.W", k, n, "int2", np.float32, "mm", lambda w: f"l.{w}",
                                           y), k, n, 17)
    onnx.checker.check_model(model)
    got = _run(model, np.eye(k, dtype=np.float32))
    np.testing.assert_array_equal(got, q.dequantize().numpy().T)
    nbytes = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert nbytes == storage_bytes(n, k, "int2", block, symmetric)
    with pytest.raises(MixrankError, match="INT8 and INT4"):
        _graph_of(lambda x, y: project(x, tensors, "l.W", k, n, "int2", np.float32, "mm", lambda w: w, y,
                                       "tensorrt"), k, n, 21)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_expanded_weights_run_the_stored_bytes_as_float32(exported, precision):
    """The expanded form computes what the packed one does, counts the same parameters and
    FLOPs, and costs only its small shape constants and nodes in the file; `rewrite_fastest`
    times both and writes the faster one."""
    from mixrank.engines import OrtSettings, matmul_flops, onnx_params, rewrite_fastest

    model, calib, d = exported
    f = compress_model(model, calib, CompressConfig(keep=0.5, precision=precision, **FAST), progress=False)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = apply_factors(model, f)(x).numpy()
    outs, params = {}, {}
    for weights in ("packed", "expanded"):
        out = d / f"w_{precision}_{weights}.onnx"
        assert rewrite_onnx(d / "o.onnx", f, out, weights=weights).to_dict()["weights"] == weights
        outs[weights] = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0]
        params[weights] = onnx_params(out)
        assert matmul_flops(out, 4) == matmul_flops(d / f"w_{precision}_packed.onnx", 4)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert ("MatMulNBits" in ops) == (weights == "packed")
    assert np.abs(outs["expanded"] - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(outs["expanded"] - outs["packed"]).max() <= 1e-4 * np.abs(ref).max()
    assert params["expanded"]["params"] == params["packed"]["params"]
    extra = params["expanded"]["file_bytes"] - params["packed"]["file_bytes"]
    assert 0 < extra < 0.25 * params["packed"]["file_bytes"], params  # nodes; a 64-wide model is the worst case
    rep, choice = rewrite_fastest(d / "o.onnx", f, d / "auto.onnx", "auto", (1, 4), OrtSettings(threads=1),
                                  seconds=0.5)
    assert choice["chosen"] == rep.weights in ("packed", "expanded")
    assert set(choice["p50_ms"]) == {"packed", "expanded"} and all(
        set(t) == {"1", "4"} and min(t.values()) > 0 for t in choice["p50_ms"].values())
    assert not [p for p in d.iterdir() if p.name.startswith(".mixrank")]  # the candidates are gone
    with pytest.raises(MixrankError, match="unknown integer weight form"):
        rewrite_onnx(d / "o.onnx", f, d / "bad.onnx", weights="loose")


@pytest.mark.parametrize("k, block, symmetric", [(48, 32, False), (40, 16, True), (200, 64, False)])
def test_dynamic_int8_runs_what_its_simulation_computes(k, block, symmetric):
    """The dynamic form is onnxruntime's dynamic int8 (the node pattern it fuses into
    DynamicQuantizeMatMul): the engine's output equals the PyTorch simulation of per-tensor
    uint8 activations times per-channel int8 codes, and those codes hold the stored weight
    to half a step per channel."""
    from mixrank.compress.store import dynamic_linear, per_channel_int8

    n = 24
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    q = quantize(W, 8, block, symmetric=symmetric)
    tensors = {"l.W.codes": q.codes, "l.W.scale": q.scale, "l.W.zero_point": q.zero_point}
    model = _graph_of(lambda x, y: project(x, tensors, "l.W", k, n, "int8", np.float32, "mm",
                                           lambda w: f"l.{w}", y, weights="dynamic"), k, n, 17)
    onnx.checker.check_model(model)
    assert sorted(nd.op_type for nd in model.graph.node) == ["Cast", "DynamicQuantizeLinear", "MatMulInteger",
                                                             "Mul", "Mul"]
    codes, scale = per_channel_int8(q)
    w = q.dequantize()
    assert codes.dtype == torch.int8
    assert (codes.float() * scale[:, None] - w).abs().le(0.5 * scale[:, None] + 1e-7).all()
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    sim = dynamic_linear(x, codes, scale).numpy()
    for optimize in (False, True):  # unfused, and fused into onnxruntime's DynamicQuantizeMatMul
        got = _run(model, x.numpy(), optimize)
        np.testing.assert_allclose(got, sim, rtol=1e-5, atol=1e-5 * np.abs(sim).max())
    # and it is int8 arithmetic, not the float weight: the error against x @ Wᵀ is that of 8-bit activations
    exact = (x @ w.T).numpy()
    err = np.abs(sim - exact).max() / np.abs(exact).max()
    assert 1e-4 < err < 2e-2, err


def test_dynamic_factors_run_in_int8_as_the_factored_model_simulates(exported):
    """A compressed ViT written with dynamic weights: every int8 projection is a
    MatMulInteger (FLOPs and parameters counted as before, fewer initializer bytes), the
    engine agrees with `apply_factors(..., int_weights="dynamic")` to fp32's tolerance and
    with the exact factored model only loosely, and `auto` never picks it."""
    from mixrank.engines import OrtSettings, matmul_flops, onnx_params, rewrite_fastest
    from mixrank.exporter import verify_rewrite

    model, calib, d = exported
    f = compress_model(model, calib, CompressConfig(keep=0.5, precision="int8", **FAST), progress=False)
    out = d / "dyn.onnx"
    rep = rewrite_onnx(d / "o.onnx", f, out, weights="dynamic")
    rewrite_onnx(d / "o.onnx", f, d / "packed.onnx")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    packed = [n.op_type for n in onnx.load(str(d / "packed.onnx")).graph.node]
    assert ops.count("MatMulInteger") == packed.count("MatMulNBits") > len(f.factored_layers())
    assert "MatMulNBits" not in ops and rep.weights == "dynamic"
    assert matmul_flops(out, 4) == matmul_flops(d / "packed.onnx", 4)
    assert onnx_params(out)["params"] == onnx_params(d / "packed.onnx")["params"]
    # one scale per channel instead of per block, no block padding (its five nodes per MatMul cost file bytes)
    assert onnx_params(out)["initializer_bytes"] <= onnx_params(d / "packed.onnx")["initializer_bytes"]
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    v = verify_rewrite(out, model, f, x, int_weights="dynamic")  # fp32's tolerance against the simulation
    assert v["ok"] and v["outputs"]["output"]["samples_agreeing"] >= 12, v
    with pytest.raises(MixrankError, match="dynamic int8 simulation"):  # the exact artifact is not what it simulates
        verify_rewrite(d / "packed.onnx", model, f, x, int_weights="dynamic")
    with pytest.raises(MixrankError, match="disagrees"):  # against the exact model: activation rounding shows
        verify_rewrite(out, model, f, x)
    with torch.no_grad():
        exact, sim = apply_factors(model, f)(x), apply_factors(model, f, int_weights="dynamic")(x)
    assert torch.nn.functional.cosine_similarity(exact, sim, dim=-1).min() > 0.99
    with pytest.raises(MixrankError, match="int_weights"):
        apply_factors(model, f, int_weights="int8")
    _, choice = rewrite_fastest(d / "o.onnx", f, d / "auto2.onnx", "auto", (1,), OrtSettings(threads=1), seconds=0.3)
    assert set(choice["p50_ms"]) == {"packed", "expanded"}


@pytest.mark.parametrize("compute", ["exact", "dynamic"])
def test_the_compression_scores_int8_as_the_engine_will_compute_it(exported, compute):
    """With ``compute="dynamic"`` the allocation and the guarded refinements score int8
    layers as the dynamic artifact runs them: the shipped score is the held-out error of
    `apply_factors(..., int_weights="dynamic")`, not of the exact model (and the other
    way round for ``"exact"``)."""
    from mixrank.compress.calibrate import split_holdout
    from mixrank.compress.score import output_error

    model, calib, _ = exported
    cfg = CompressConfig(keep=0.5, precision="int8", compute=compute, **FAST)
    f = compress_model(model, calib, cfg, progress=False)
    assert f.plan["config"]["quantize"]["compute"] == compute
    x = torch.cat(split_holdout(list(calib), cfg.holdout)[1])
    with torch.no_grad():
        ref = model(x)
        err = {m: output_error(apply_factors(model, f, int_weights=m)(x), ref, cfg.metric)
               for m in ("exact", "dynamic")}
    score = f.plan["allocation"].refinement.score
    assert err["exact"] != err["dynamic"]
    assert score == pytest.approx(err[compute], rel=1e-9)
    with pytest.raises(MixrankError, match="compute"):
        CompressConfig(compute="int8")
