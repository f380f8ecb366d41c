import pytest
import torch

from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model
from mixrank.compress.factor import activation_error, fit_layer, whitened_spectrum
from mixrank.compress.factor.sparse import SparseTerm, fit_sparse, fit_values, sparse_cost
from mixrank.compress.refine import compensate


def _problem(m=40, n=32, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.linspace(2, 0.05, n)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    X[:, :3] *= 20
    return W, X.T @ X


@pytest.mark.parametrize("structure", ["channel", "row"])
def test_closed_form_values_are_optimal_for_their_support(structure):
    W, G = _problem()
    spec = whitened_spectrum(W, G)
    A, B = spec.factors(8)
    R = W - A.double() @ B.double()
    S = fit_sparse(structure, 4, R, G, lam=0.0)
    S.value = fit_values(structure, S.index, R, G, lam=0.0)  # exact optimum, no ridge
    base = activation_error(R, S.dense(32), G)
    assert base < activation_error(R, torch.zeros_like(R), G)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):  # perturb one value at a time
        i, j = (torch.randint(0, s, (1,), generator=g).item() for s in S.value.shape)
        for eps in (1e-3, -1e-3):
            v = S.value.clone()
            v[i, j] += eps * (1 + v[i, j].abs())
            assert activation_error(R, SparseTerm(structure, S.index, v).dense(32), G) > base


@pytest.mark.parametrize("structure", ["channel", "row"])
def test_alternation_and_compensation_never_increase_the_loss(structure):
    W, G = _problem(seed=3)
    spec = whitened_spectrum(W, G)
    fit = fit_layer(W, G, 8, structure, 3, alternate=4, spectrum=spec)
    assert all(b <= a for a, b in zip(fit.history, fit.history[1:], strict=False))
    assert fit.history[-1] < fit.history[0]  # alternation helped here
    comp = compensate(fit, W, G, spec.ref, steps=150)
    assert comp.nmse <= fit.nmse
    # from a deliberately spoiled start compensation must make real progress
    spoiled = fit_layer(W, G, 8, structure, 3, spectrum=spec)
    spoiled.A = spoiled.A * 1.2
    from mixrank.compress.factor import nmse
    spoiled.nmse = nmse(W, spoiled.A, spoiled.B, spoiled.sparse, G, spec.ref)
    fixed = compensate(spoiled, W, G, spec.ref, steps=300, lr=1e-2)
    assert fixed.nmse < 0.5 * spoiled.nmse


def test_sparse_cost_counts_values_and_indices():
    assert sparse_cost("channel", 5, 64, 32) == 64 * 5 + 5
    assert sparse_cost("row", 5, 64, 32) == 2 * 64 * 5
    assert sparse_cost("row", 5, 64, 32, value_bytes=2) == 64 * 5 + 2 * 64 * 5
    assert sparse_cost("none", 5, 64, 32) == 0


@pytest.mark.parametrize("structure", ["channel", "row"])
def test_budget_accounting_matches_stored_tensors(tiny_vit, structure):
    calib = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    # sparse terms live on low-rank layers (a pair's forms are accounted in test_pairs.py)
    cfg = CompressConfig(keep=0.4, sparse=structure, compensate_steps=20, search_evals=30,
                         overrides={"blocks.0.mlp.fc1": {"sparse_k": 6}}, structure="lowrank")
    f = compress_model(tiny_vit, calib, cfg, progress=False)
    total_cost = 0
    for name, info in f.layers.items():
        if info["dense"]:
            continue
        t = f.tensors
        values = t[f"{name}.A"].numel() + t[f"{name}.B"].numel()
        idx = t.get(f"{name}.sparse_index")
        if idx is not None:
            values += t[f"{name}.sparse_value"].numel()
            assert idx.dtype == torch.int32 and idx.numel() == info["sparse"]["indices"]
        assert values == info["params_after"]
        nbytes = sum(v.nbytes for k, v in t.items() if k.startswith(name + "."))
        assert nbytes == info["bytes_after"]
        total_cost += info["cost_params"]
    assert f.layers["blocks.0.mlp.fc1"]["sparse"]["k"] == 6
    assert total_cost == f.plan["totals"]["cost_params"] <= f.plan["budget"]["budget_params"]
    small = apply_factors(tiny_vit, f)
    assert sum(p.numel() for p in small.parameters()) == f.plan["totals"]["model_params_after"]


@pytest.mark.parametrize("structure", ["channel", "row"])
def test_factored_linear_sparse_path_matches_dense(tiny_vit, structure):
    calib = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    f = compress_model(tiny_vit, calib, CompressConfig(keep=0.5, sparse=structure,
                                                       search_evals=10,
                                                       overrides={"blocks.1.mlp.fc2": {"sparse_k": 4}}),
                       progress=False)
    small = apply_factors(tiny_vit, f)
    fl = small.blocks[1].mlp.fc2
    assert fl.sparse_structure == structure
    S = SparseTerm(structure, fl.sparse_index, fl.sparse_value.detach()).dense(fl.in_features)
    W = fl.A.detach() @ fl.B.detach() + S
    x = torch.randn(3, 5, fl.in_features)
    torch.testing.assert_close(fl(x), x @ W.T + fl.bias, rtol=1e-4, atol=1e-4)


def test_bad_sparse_options_fail_before_any_work(tiny_vit):
    class Exploding:
        def __iter__(self):
            raise AssertionError("calibration data was read")

    with pytest.raises(MixrankError, match="larger than the layer's 64 input channels"):
        compress_model(tiny_vit, Exploding(),
                       CompressConfig(sparse="channel", overrides={"blocks.0.attn.qkv": {"sparse_k": 65}}),
                       progress=False)
    with pytest.raises(MixrankError, match="unknown sparse structure"):
        CompressConfig(sparse="diagonal")
    with pytest.raises(MixrankError, match="compensate_steps must be >= 0"):
        CompressConfig(compensate_steps=-1)


@pytest.mark.parametrize("method", ["asvd", "oats"])
def test_baselines_meet_the_budget(tiny_vit, method):
    calib = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    f = compress_model(tiny_vit, calib, CompressConfig(method=method, keep=0.4), progress=False)
    assert f.plan["totals"]["cost_params"] <= f.plan["budget"]["budget_params"]
    small = apply_factors(tiny_vit, f)
    x = calib[0]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(small(x), tiny_vit(x)).mean()
    assert cos > 0.5


@pytest.mark.slow
def test_sequential_and_block_reconstruction_are_guarded(digits):
    x = digits["xtr"][:256]
    calib = [x[i:i + 32] for i in range(0, 256, 32)]
    f = compress_model(digits["model"], calib,
                       CompressConfig(keep=0.2, sequential=True, block_steps=30, search_evals=30,
                                      compensate_steps=0),
                       progress=False)
    ref = f.plan["allocation"]["refinement"]
    names = [v["name"] for v in ref["variants"]]
    assert names[0] == "closed_form" and any(n.endswith("+sequential+block") for n in names)
    closed = ref["variants"][0]["score"]
    assert ref["score"] <= closed  # the default never loses to the closed form on held-out data
    small = apply_factors(digits["model"], f)
    with torch.no_grad():
        agree = (small(digits["xte"]).argmax(-1) == digits["model"](digits["xte"]).argmax(-1)).float().mean()
    assert agree > 0.97
