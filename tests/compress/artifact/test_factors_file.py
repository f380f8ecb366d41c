import copy
import json

import pytest
import torch

from mixrank.compress import (
    CompressConfig,
    FactoredLinear,
    MixrankError,
    apply_factors,
    compress_model,
    load_factors,
    save_factors,
)


@pytest.fixture
def factors(tiny_vit):
    calib = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    return compress_model(tiny_vit, calib, CompressConfig(method="whiten", keep=0.5),
                          progress=False)


def test_round_trip_is_bit_identical(factors, tmp_path):
    p = save_factors(factors, tmp_path / "m.mixrank.safetensors")
    back = load_factors(p)
    from mixrank.compress.artifact._factors import recorded_figures

    # the file records measured figures rounded (identical across thread counts), all else exactly
    assert back.plan == recorded_figures(json.loads(json.dumps(factors.plan)))
    for name, info in factors.plan.layers.items():
        assert back.plan.layers[name].nmse == pytest.approx(info.nmse, rel=1e-7)
    assert set(back.tensors) == set(factors.tensors)
    for k, v in factors.tensors.items():
        assert back.tensors[k].dtype == v.dtype
        assert torch.equal(back.tensors[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.mixrank.safetensors"]


def test_plan_records_what_design_md_requires(factors):
    plan = factors.plan
    for key in ("format_version", "source", "budget", "calibration", "layers", "allocation"):
        assert key in plan
    assert len(plan["source"]["checkpoint_sha256"]) == 64
    info = plan["layers"]["blocks.0.mlp.fc1"]
    for key in ("shape", "rank", "sparse", "nmse", "params_before", "params_after", "sha256"):
        assert key in info
    assert plan["allocation"]["candidates"][0]["name"] == "uniform"


def test_tampered_tensor_is_refused(factors, tmp_path):
    p = save_factors(factors, tmp_path / "m.safetensors")
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor's data
    p.write_bytes(bytes(raw))
    with pytest.raises(MixrankError, match="modified"):
        load_factors(p)


def test_not_a_factors_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(MixrankError, match="not a mixrank factors file"):
        load_factors(p)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not safetensors")
    with pytest.raises(MixrankError, match="not a readable safetensors"):
        load_factors(junk)
    with pytest.raises(MixrankError, match="does not exist"):
        load_factors(tmp_path / "missing.safetensors")


def test_factors_of_another_model_are_refused(factors, tiny_vit):
    other = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        other.blocks[1].mlp.fc1.weight.add_(1e-3)
    with pytest.raises(MixrankError, match=r"do not belong.*blocks\.1\.mlp\.fc1"):
        apply_factors(other, factors)


def test_apply_factors_leaves_the_model_alone(factors, tiny_vit):
    small = apply_factors(tiny_vit, factors)
    assert isinstance(small.blocks[0].mlp.fc1, FactoredLinear)
    assert isinstance(tiny_vit.blocks[0].mlp.fc1, torch.nn.Linear)
    x = torch.randn(2, 3, 32, 32)
    lin = tiny_vit.blocks[0].mlp.fc1
    fl = small.blocks[0].mlp.fc1
    h = torch.randn(2, 5, lin.in_features)
    torch.testing.assert_close(fl(h), h @ (fl.A @ fl.B).T + lin.bias, rtol=1e-5, atol=1e-5)
    assert small(x).shape == tiny_vit(x).shape


def test_failed_write_leaves_nothing(factors, tmp_path, monkeypatch):
    import pathlib

    real_write = pathlib.Path.write_bytes

    def half_write(self, data):  # the writer's bytes reach the disk through Path.write_bytes
        real_write(self, b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_factors(factors, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "d").mkdir()
    with pytest.raises(MixrankError, match="directory"):
        save_factors(factors, tmp_path / "d")
