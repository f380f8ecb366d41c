"""The allocation over every form per layer: the Lagrangian proposal meets the budget and
follows the weighted errors, and a mixed plan (dense layers at several integer widths and
blocks beside factored ones) ships within its bytes, exactly as stored, through the
factored model and onnxruntime."""

import numpy as np
import pytest
import torch

from mixrank.compress import CompressConfig, apply_factors, compress_model, save_factors
from mixrank.compress.allocate import LayerSpace, Option, propose


def _opt(name, cost, error, label):
    return Option(LayerSpace(name, 8, 8, 8, 8), None, cost, error, label)


def test_the_proposal_meets_the_budget_and_buys_the_largest_weighted_gains():
    options = {
        "a": [_opt("a", 10, 1.0, "small"), _opt("a", 20, 0.5, "medium"), _opt("a", 40, 0.1, "large")],
        "b": [_opt("b", 10, 1.0, "small"), _opt("b", 20, 0.5, "medium"), _opt("b", 40, 0.1, "large")],
    }
    even = propose(options, {"a": 1.0, "b": 1.0}, 40)
    assert even.cost <= 40 and {o.label for o in even.options.values()} == {"medium"}
    skewed = propose(options, {"a": 100.0, "b": 1.0}, 50)  # a's errors cost the output 100 times more
    assert skewed.cost <= 50 and skewed.options["a"].label == "large" and skewed.options["b"].label == "small"
    assert propose(options, {"a": 1.0, "b": 1.0}, 19) is None  # not even the cheapest options fit
    rich = propose(options, {"a": 1.0, "b": 1.0}, 1000)
    assert {o.label for o in rich.options.values()} == {"large"}


@pytest.mark.slow
def test_a_mixed_plan_ships_within_its_bytes_and_runs_on_onnxruntime(digits, tmp_path):
    """The digits ViT below int2's bytes (0.07x of its float32 weight bytes): the plan mixes
    forms, precisions and blocks, counts what the exporter writes, stays within the budget,
    and the rewritten graph on onnxruntime is the factored PyTorch model."""
    ort = pytest.importorskip("onnxruntime")
    from mixrank.exporter import export_onnx, rewrite_onnx

    model = digits["model"]
    calib = [digits["xtr"][i:i + 64] for i in range(0, 512, 64)]
    f = compress_model(model, calib, CompressConfig(bytes="0.07x", effort="fast"), progress=False)
    plan = f.plan
    assert plan.budget.precision == "auto"  # a bytes budget alone chooses the precision per layer
    assert any(c["name"].startswith("mixed") for c in plan.allocation.candidates)
    assert plan.totals.bytes_after <= plan.budget.budget
    assert sum(i.bytes_after for i in plan.layers.values()) == plan.totals.bytes_after
    save_factors(f, tmp_path / "f.safetensors")
    x = digits["xte"][:32]
    export_onnx(model, x[:2], tmp_path / "o.onnx")
    rewrite_onnx(tmp_path / "o.onnx", tmp_path / "f.safetensors", tmp_path / "c.onnx")
    sess = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = apply_factors(model, f).eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_a_tensorrt_artifact_chooses_no_int2(digits, tmp_path):
    """TensorRT dequantizes INT8 and INT4 only: a job for TensorRT offers the allocation no int2
    (dense, factors or the residual's Q), and its factors rewrite to the TensorRT form; a bad
    ``widths`` is refused by name."""
    from mixrank.compress import MixrankError, job_config
    from mixrank.exporter import export_onnx, rewrite_onnx

    cfg = job_config({"bytes": "0.12x", "effort": "fast"}, tensorrt=True)
    assert cfg.quantize.widths == ("int8", "int4") and cfg.quantize.scheme == "symmetric"
    assert job_config({"bytes": "0.12x"}).quantize.widths == ("int8", "int4", "int2")
    model = digits["model"]
    calib = [digits["xtr"][i:i + 64] for i in range(0, 512, 64)]
    f = compress_model(model, calib, cfg, progress=False)
    used = {i.precision for i in f.layers.values()} | {i.residual_precision for i in f.layers.values()}
    assert "int2" not in used and f.plan.totals.bytes_after <= f.plan.budget.budget
    save_factors(f, tmp_path / "f.safetensors")
    export_onnx(model, digits["xte"][:2], tmp_path / "o.onnx")
    rewrite_onnx(tmp_path / "o.onnx", tmp_path / "f.safetensors", tmp_path / "t.onnx", target="tensorrt")
    for bad in ("int4", ["int3"], []):
        with pytest.raises(MixrankError, match="widths must be"):
            CompressConfig(bytes="0.12x", widths=bad)
