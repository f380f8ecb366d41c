"""The residual form, ``W ≈ A B + Q``: its fit beats quantization alone at the same
integer width, alternation never raises its error, and it goes through the factors file,
the factored model, the ONNX rewrite and onnxruntime with the low-rank branch kept apart
from ``MatMulNBits``."""

import numpy as np
import onnx
import pytest
import torch

from mixrank.compress import Factors, Quantize, apply_factors, save_factors, weight_fingerprint
from mixrank.compress.factor import FORMS, fit_residual, whitened_spectrum
from mixrank.compress.store import quantize, storage_bytes


def _problem(m=48, n=64, tokens=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    W[:, :3] *= 6  # a few heavy input channels, as in ViT and BERT weights
    X = torch.randn(tokens, n, generator=g) @ (torch.randn(n, n, generator=g) * torch.linspace(2, 0.1, n))
    return W, (X.T @ X).double()


def _nmse(W, What, G):
    E = W.double() - What.double()
    return float(torch.einsum("ij,jk,ik->", E, G, E) / torch.einsum("ij,jk,ik->", W.double(), G, W.double()))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits, block", [(2, 32), (4, 32)])
def test_the_residual_fit_beats_quantization_alone_and_never_gets_worse(seed, bits, block):
    W, G = _problem(seed=seed)
    q = Quantize()
    alone = _nmse(W, quantize(W, bits, block, G, grid="mse").dequantize(), G)
    fit = fit_residual(W, G, whitened_spectrum(W, G), 8, "fp16", bits, block, q)
    assert fit.form == "residual" and fit.start in ("lowrank", "quant") and fit.rank == 8
    assert fit.nmse < 0.8 * alone, (fit.nmse, alone)
    assert all(b <= a for a, b in zip(fit.history, fit.history[1:], strict=False))
    # the error reported is the error of what is stored: A, B at fp16 and Q as quantized
    stored = FORMS["residual"].store(fit, "fp16", q, G)
    assert fit.nmse == pytest.approx(_nmse(W, stored.A @ stored.B + fit.residual.dequantize(), G), rel=1e-6)


def test_the_residual_form_through_the_file_the_model_and_onnxruntime(tmp_path):
    """An MLP whose first layer is stored as ``A B`` (fp16) plus an int2 residual: the
    factored PyTorch model, the rewritten ONNX graph on onnxruntime (MatMulNBits beside two
    MatMuls) and the byte accounting agree."""
    ort = pytest.importorskip("onnxruntime")
    from exporter_helpers import build_graph, mlp

    from mixrank.exporter import rewrite_onnx

    model = mlp([64, 48, 8], 0)
    W = model.get_submodule("0").weight.detach()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 64, generator=g)
    G = (X.T @ X).double()
    q = Quantize()
    fit = fit_residual(W, G, whitened_spectrum(W, G), 8, "fp16", 2, 32, q)
    stored = FORMS["residual"].store(fit, "fp16", q, G)
    m, n = W.shape
    plan = {"format_version": 4, "layers": {"0": {
        "shape": [m, n], "rank": 8, "dense": False, "precision": "fp16", "form": "residual",
        "residual_precision": "int2", "residual_block": 32, "sha256": weight_fingerprint(W),
        "sparse": {"structure": "none", "k": 0, "values": 0, "indices": 0, "params": 0}}}}
    f = Factors({f"0.{k}": v for k, v in stored.tensors.items()}, plan)
    save_factors(f, tmp_path / "f.safetensors")
    onnx.save(build_graph(model, ["matmul", "matmul"], [1.0, 1.0], 16), str(tmp_path / "m.onnx"))
    rep = rewrite_onnx(tmp_path / "m.onnx", tmp_path / "f.safetensors", tmp_path / "c.onnx")
    assert rep.rewritten[0]["form"] == "residual" and rep.params_after == m * n + 8 * (m + n)
    graph = onnx.load(str(tmp_path / "c.onnx")).graph
    ops = [nd.op_type for nd in graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 3  # the low-rank branch: two MatMuls
    nbits = next(nd for nd in graph.node if nd.op_type == "MatMulNBits")
    assert {a.name: a.i for a in nbits.attribute}["bits"] == 2
    q_bytes = sum(len(t.raw_data) for t in graph.initializer if t.name in set(nbits.input[1:]))
    assert q_bytes == storage_bytes(m, n, "int2", 32)
    small = apply_factors(model, tmp_path / "f.safetensors")
    x = torch.randn(16, 64, generator=g)
    sess = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = small(x).numpy()
        orig = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - orig).max() < 0.5 * np.abs(orig).max()  # a real approximation, not noise
