"""Exact factors (AB = W) must leave timm models' outputs unchanged after the rewrite."""

import numpy as np
import pytest
import torch
from exporter_helpers import factors_from_weights

from mixrank.compress import select_layers
from mixrank.exporter import check_tensorrt_compat, export_onnx, rewrite_onnx, run_onnxruntime

pytestmark = pytest.mark.slow  # full-size timm models at 224 px

MODELS = [
    ("deit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("swin_tiny_patch4_window7_224", {}),  # Swin: windowed attention, hierarchical stages
    ("pvt_v2_b0", {}),  # PVT-v2: spatial-reduction attention, conv in the MLP
]


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m for m, _ in MODELS])
def test_exact_factors_preserve_outputs(tmp_path, name, kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 224, 224)
    export_onnx(model, x, tmp_path / "orig.onnx")
    layers = select_layers(model)
    factors = factors_from_weights(model, layers)
    rep = rewrite_onnx(tmp_path / "orig.onnx", factors, tmp_path / "comp.onnx")
    assert len({r["layer"] for r in rep.rewritten}) == len(layers)
    a = run_onnxruntime(tmp_path / "orig.onnx", {"input": x.numpy()})[0]
    b = run_onnxruntime(tmp_path / "comp.onnx", {"input": x.numpy()})[0]
    err = np.abs(a - b).max() / np.abs(a).max()
    assert err < 1e-4, err
    assert check_tensorrt_compat(tmp_path / "comp.onnx")["ok"]
