import pytest
import torch

from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model
from mixrank.compress.allocate import layer_spaces, uniform_allocation


def _calib(n=4, bs=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(bs, 3, 32, 32, generator=g) for _ in range(n)]


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("method", ["mixrank", "whiten", "svd"])
def test_budget_is_met_within_one_rank_step(tiny_vit, keep, method):
    search = {"search_rounds": 2, "search_evals": 60} if method == "mixrank" else {}  # others refuse them
    cfg = CompressConfig(method=method, keep=keep, **search)
    f = compress_model(tiny_vit, _calib(), cfg, progress=False)
    t, b = f.plan["totals"], f.plan["budget"]
    step_cost = max(8 * sum(i["shape"]) for i in f.layers.values())
    assert t["cost_params"] <= b["budget_params"]
    assert b["budget_params"] - t["cost_params"] < step_cost
    small = apply_factors(tiny_vit, f)
    assert _params(small) == t["model_params_after"]
    assert _params(tiny_vit) == t["model_params_before"]
    for name, info in f.layers.items():
        mod = small.get_submodule(name)
        n_weight = sum(p.numel() for k, p in mod.named_parameters() if k != "bias")
        assert n_weight == info["params_after"]


def test_budget_in_params_and_bytes(tiny_vit):
    total = sum(m.weight.numel() for n, m in tiny_vit.named_modules() if n.startswith("blocks.")
                and isinstance(m, torch.nn.Linear))
    f1 = compress_model(tiny_vit, _calib(), CompressConfig(method="whiten", params=total // 2),
                        progress=False)
    f2 = compress_model(tiny_vit, _calib(), CompressConfig(method="whiten", bytes=total,
                                                           dtype="float16"), progress=False)
    assert f1.plan["budget"]["budget_params"] == total // 2
    assert f2.plan["budget"]["budget_params"] == total // 2
    assert f1.plan["totals"]["params_after"] == f2.plan["totals"]["params_after"]


def test_overrides_are_respected(tiny_vit):
    ov = {"blocks.0.attn.qkv": {"dense": True}, "blocks.1.mlp.fc1": {"rank": 12},
          "blocks.1.mlp.fc2": {"min_rank": 40}}
    f = compress_model(tiny_vit, _calib(), CompressConfig(keep=0.5, overrides=ov,
                                                          search_evals=60), progress=False)
    assert f.layers["blocks.0.attn.qkv"]["dense"] is True
    assert f.layers["blocks.1.mlp.fc1"]["rank"] == 12
    assert f.layers["blocks.1.mlp.fc2"]["rank"] >= 40
    assert "blocks.0.attn.qkv.A" not in f.tensors


def test_layer_that_cannot_save_stays_dense():
    spaces = layer_spaces({"a": (16, 16), "b": (256, 256)}, step=8, min_rank=8, overrides={})
    assert spaces["a"].dense and not spaces["b"].dense  # 8*(16+16) >= 16*16
    alloc = uniform_allocation(spaces, budget=256 + 256 * 256 // 2, step=8)
    assert alloc["a"] is None and alloc["b"] % 8 == 0


def test_infeasible_budget_names_the_range(tiny_vit):
    with pytest.raises(MixrankError, match=r"outside the feasible range \[.*keep in \[0\.\d+"):
        compress_model(tiny_vit, _calib(), CompressConfig(keep=0.01), progress=False)
    with pytest.raises(MixrankError, match="feasible range"):
        compress_model(tiny_vit, _calib(), CompressConfig(params=10**9), progress=False)


def test_override_naming_no_layer_lists_close_matches(tiny_vit):
    with pytest.raises(MixrankError, match=r"blocks\.0\.mlp\.fc3.*did you mean.*blocks\.0\.mlp\.fc"):
        compress_model(tiny_vit, _calib(),
                       CompressConfig(overrides={"blocks.0.mlp.fc3": {"dense": True}}),
                       progress=False)
    with pytest.raises(MixrankError, match="not selected"):
        compress_model(tiny_vit, _calib(), CompressConfig(overrides={"head": {"dense": True}}),
                       progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"keep": 1.5}, "keep must be"), ({"keep": 0.3, "params": 10}, "one budget"),
    ({"method": "magic"}, "unknown method"), ({"rank_step": 0}, "rank_step"),
    ({"overrides": {"x": {"rnk": 3}}}, "unknown key"), ({"metric": "l1"}, "unknown metric"),
])
def test_config_validates_itself(kwargs, match):
    with pytest.raises(MixrankError, match=match):
        CompressConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = CompressConfig(keep=0.3, overrides={"a": {"rank": 8}})
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_calibration_data(tiny_vit):
    with pytest.raises(MixrankError, match="empty"):
        compress_model(tiny_vit, [], progress=False)
    bad = [torch.full((4, 3, 32, 32), float("inf"))]
    with pytest.raises(MixrankError, match="NaN or Inf"):
        compress_model(tiny_vit, bad, progress=False)
    with pytest.raises(MixrankError, match="no Linear layer selected"):
        compress_model(tiny_vit, _calib(), CompressConfig(exclude=["*"]), progress=False)


def test_text_model_with_dict_batches(text_model):
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50, (4, 9), generator=g),
                "attention_mask": torch.ones(4, 9, dtype=torch.long)} for _ in range(4)]
    f = compress_model(text_model, batches, CompressConfig(keep=0.6, token_mask="attention_mask",
                                                           rank_step=4, min_rank=4),
                       progress=False)
    small = apply_factors(text_model, f)
    with torch.no_grad():
        y0, y1 = text_model(**batches[0]), small(**batches[0])
    assert torch.nn.functional.cosine_similarity(y0, y1).min() > 0.9
