"""Pairwise structures (mixrank.compress.factor.pairs): query/key, value/output and MLP pairs
shrink their shared dimension. Checked on a small random BERT (the MiniLM family) and a
timm ViT: detection, exactness at full size, the closed forms' errors against the errors
measured on the calibration tokens, ties in the allocation, the factors file, and the ONNX
rewrite on onnxruntime against the factored PyTorch model."""

import numpy as np
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model  # noqa: E402
from mixrank.compress.artifact import FactoredLinear, factored_from_fit, set_module  # noqa: E402
from mixrank.compress.calibrate import collect_stats  # noqa: E402
from mixrank.compress.factor import closed_form_fit  # noqa: E402
from mixrank.compress.factor.pairs import find_pairs, pair_spectra  # noqa: E402


class Encoder(nn.Module):
    """BERT + mean pooling over real tokens (the MiniLM sentence encoder's shape)."""

    def __init__(self, layers: int = 2, hidden: int = 48, heads: int = 4, inter: int = 96):
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=inter,
                                      max_position_embeddings=64)
        self.bert = transformers.BertModel(cfg)
        self.eval()

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _batches(n: int = 8, size: int = 8, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(4, 20, (size,), generator=g)
        ids = torch.zeros((size, int(lengths.max())), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, k in enumerate(lengths.tolist()):
            ids[i, :k] = torch.randint(5, 120, (k,), generator=g)
            mask[i, :k] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


ENC = ["bert.encoder.*"]


def _stats(model, batches):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    return names, collect_stats(model, names, batches, "attention_mask", progress=False)


def _with_fits(model, fits):
    out = __import__("copy").deepcopy(model)
    for n, f in fits.items():
        set_module(out, n, factored_from_fit(f, out.get_submodule(n)))
    return out


def test_pairs_are_found_in_bert_and_timm():
    model = Encoder()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]
    kinds = [(p.kind, p.first.split(".")[-2:], p.heads, p.head_dim) for p in find_pairs(model, names)]
    assert [k[0] for k in kinds] == ["qk", "vo", "mlp"] * 2
    assert kinds[0][2:] == (4, 12)
    # a layer left out (an override, or not selected) leaves its pair out
    assert all(p.kind != "qk" for p in find_pairs(model, [n for n in names if not n.endswith("key")])
               if p.first.startswith("bert.encoder.layer.0"))
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    vnames = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")]
    assert [(p.kind, p.first, p.second) for p in find_pairs(vit, vnames)] == [
        ("mlp", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"), ("mlp", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2")]


def test_full_size_pairs_reproduce_the_model():
    """Keeping every component, each pair is exact: the model's output is unchanged (the
    query/key pair up to a constant per logit row, which softmax ignores)."""
    model = Encoder()
    batches = _batches()
    names, calib = _stats(model, batches)
    spectra = pair_spectra(find_pairs(model, names), model, calib.layers, damping=1e-9)
    fits = {n: closed_form_fit(s, s.max_rank) for n, s in spectra.items()}
    small = _with_fits(model, fits)
    assert all(isinstance(small.get_submodule(n), FactoredLinear) for n in fits)
    with torch.no_grad():
        for b in _batches(seed=5):
            ref, out = model(**b), small(**b)
            assert torch.allclose(out, ref, atol=2e-4, rtol=1e-3), float((out - ref).abs().max())


def _capture(model, name, batches):
    """The inputs of layer ``name`` on the real tokens of ``batches``, (tokens, n)."""
    rows, mask = [], [None]
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: rows.append(a[0][mask[0]]))
    with torch.no_grad():
        for b in batches:
            mask[0] = b["attention_mask"].bool()
            model(**b)
    h.remove()
    return torch.cat(rows).double()


@torch.no_grad()
def test_closed_form_errors_are_the_measured_errors():
    """Each pair's predicted error at size r is what its layers do on the calibration
    tokens (damping ~0; within 1 %: the factors are float32): the value/output heads'
    outputs, fc2's output after the Nyström refit (bias corrected), and the query/key
    bilinear form over all token pairs."""
    model = Encoder()
    batches = _batches(n=4)
    names, calib = _stats(model, batches)
    pairs = find_pairs(model, names)
    spectra = pair_spectra(pairs, model, calib.layers, damping=1e-10)
    by = {p.kind: p for p in pairs if p.first.startswith("bert.encoder.layer.1")}
    # value/output: attention probabilities are untouched, so O's new input is T·(its old input)
    vo = by["vo"]
    r = 20
    fv, fo = closed_form_fit(spectra[vo.first], r), closed_form_fit(spectra[vo.second], r)
    X = _capture(model, vo.second, batches)  # O's input: the attention-mixed values
    lo, lv = model.get_submodule(vo.second), model.get_submodule(vo.first)
    # each head's new values are a linear map T of its old ones, T = B' W_v⁻¹ (W_v is square, full rank)
    T_rows = fv.B.double() @ torch.linalg.inv(lv.weight.double())  # (r, H d)
    Y = X @ lo.weight.double().T
    Y_hat = (X @ T_rows.T) @ fo.A.double().T
    measured = float(((Y - Y_hat) ** 2).sum())
    predicted = float(spectra[vo.second].err[r])
    assert measured == pytest.approx(predicted, rel=1e-2), (measured, predicted)
    # mlp: fc2's output on the kept neurons, with the refitted bias
    mlp = by["mlp"]
    r = 40
    f2 = closed_form_fit(spectra[mlp.second], r)
    Z = _capture(model, mlp.second, batches)
    l2 = model.get_submodule(mlp.second)
    Y = Z @ l2.weight.double().T + l2.bias.double()
    Y_hat = Z[:, f2.index] @ f2.A.double().T + l2.bias.double() + f2.bias.double()
    measured = float(((Y - Y_hat) ** 2).sum())
    assert measured == pytest.approx(float(spectra[mlp.second].err[r]), rel=1e-2)
    # query/key: Σ over all pairs of tokens of (q·k − q'·k')²
    qk = by["qk"]
    r = 24
    fq, fk = closed_form_fit(spectra[qk.first], r), closed_form_fit(spectra[qk.second], r)
    X = _capture(model, qk.first, batches)
    lq, lk = model.get_submodule(qk.first), model.get_submodule(qk.second)
    q, k = X @ lq.weight.double().T + lq.bias.double(), X @ lk.weight.double().T + lk.bias.double()
    qn = X @ fq.B.double().T + (fq.bias.double() + lq.bias.double())[fq.index]
    kn = X @ fk.B.double().T + (fk.bias.double() + lk.bias.double())[fk.index]
    H, d = qk.heads, qk.head_dim
    total = 0.0
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        keep = [j for j, s in enumerate(fq.index.tolist()) if h * d <= s < (h + 1) * d]
        S = q[:, sl] @ k[:, sl].T
        S_hat = qn[:, keep] @ kn[:, keep].T
        total += float(((S - S_hat) ** 2).sum())
    assert total == pytest.approx(float(spectra[qk.first].err[r]), rel=1e-2)


@pytest.mark.slow
def test_allocation_keeps_pairs_tied_and_files_round_trip(tmp_path):
    model = Encoder()
    calib = _batches()
    f = compress_model(model, calib, CompressConfig(keep=0.5, include=ENC, token_mask="attention_mask",
                                                   structure="pairs", search_evals=30, distill_steps=20),
                       progress=False)
    layers = f.plan.layers
    assert f.plan.allocation.family == "uniform pairs"
    pairs = {}
    for info in layers.values():
        assert info.form in ("rows", "cols") and info.pair
        pairs.setdefault(info.pair, []).append(info.rank)
    assert len(pairs) == 6 and all(len(set(r)) == 1 for r in pairs.values()), pairs
    assert f.plan.totals.cost <= f.plan.budget.budget
    # the stored bytes are what the budget counted
    assert sum(i.cost for i in layers.values()) == f.plan.totals.cost
    from mixrank.compress import load_factors, save_factors

    save_factors(f, tmp_path / "f.safetensors")
    g = load_factors(tmp_path / "f.safetensors")
    with torch.no_grad():
        b = _batches(seed=9)[0]
        assert torch.equal(apply_factors(model, f)(**b), apply_factors(model, g)(**b))
        # distillation trains the kept factor and the bias delta, never the selection
        for n, info in layers.items():
            t = g.tensors
            assert t[f"{n}.index"].dtype == torch.int32 and t[f"{n}.index"].numel() == info.rank
            assert (f"{n}.A" in t) == (info.form == "cols") and (f"{n}.B" in t) == (info.form == "rows")


@pytest.mark.slow
def test_auto_structure_is_never_worse_than_low_rank_on_the_held_out_batches():
    model = Encoder()
    calib = _batches()
    cfg = dict(keep=0.5, include=ENC, token_mask="attention_mask", effort="fast")
    auto = compress_model(model, calib, CompressConfig(structure="auto", **cfg), progress=False)
    low = compress_model(model, calib, CompressConfig(structure="lowrank", **cfg), progress=False)
    fams = {c["name"]: c["score"] for c in auto.plan.allocation.candidates if c["name"].startswith("uniform")}
    assert set(fams) == {"uniform", "uniform pairs"}
    assert auto.plan.allocation.chosen_score <= low.plan.allocation.chosen_score + 1e-12
    assert all(i.form == "lowrank" for i in low.plan.layers.values())


def test_structure_settings_are_checked():
    model = Encoder()
    with pytest.raises(MixrankError, match="ignored by method 'whiten'"):
        CompressConfig(method="whiten", structure="pairs")
    with pytest.raises(MixrankError, match="unknown structure"):
        CompressConfig(structure="pair")
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(MixrankError, match="no pair of selected layers"):
        compress_model(mlp, [torch.randn(4, 8)], CompressConfig(include=["*"], structure="pairs"), progress=False)
    del model


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_pairs_rewrite_runs_on_onnxruntime(tmp_path, precision):
    """The pairwise forms through the ONNX rewriter (Gather/Mul around the kept factor, the
    bias delta added) on a BERT exported by torch: onnxruntime matches the factored
    PyTorch model, and the rewritten layers hold what the plan counted."""
    ort = pytest.importorskip("onnxruntime")
    from mixrank.compress import save_factors
    from mixrank.exporter import rewrite_onnx

    model = Encoder()
    calib = _batches()
    budget = {"keep": 0.5} if precision == "fp32" else {"bytes": "0.3x", "precision": "int8"}
    f = compress_model(model, calib, CompressConfig(include=ENC, token_mask="attention_mask", structure="pairs",
                                                   distill_steps=10, search_evals=20, **budget), progress=False)
    save_factors(f, tmp_path / "f.safetensors")
    b = _batches(seed=3)[0]
    torch.onnx.export(model, (b["input_ids"], b["attention_mask"]), str(tmp_path / "m.onnx"), opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["out"], dynamo=False,
                      dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}})
    rep = rewrite_onnx(tmp_path / "m.onnx", tmp_path / "f.safetensors", tmp_path / "small.onnx")
    assert len(rep.rewritten) == 12 and not rep.dense
    if precision == "fp32":
        assert rep.params_after == f.plan.totals.cost_params
    sess = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    small = apply_factors(model, f)
    for bt in _batches(n=2, seed=11):
        y = sess.run(None, {k: v.numpy() for k, v in bt.items()})[0]
        with torch.no_grad():
            yt = small(**bt).numpy()
        assert np.abs(y - yt).max() <= 1e-4 * max(1.0, np.abs(yt).max()), np.abs(y - yt).max()


@torch.no_grad()
def test_sequential_refit_keeps_each_pair_form_and_fits_the_compressed_path():
    """The block-by-block refit runs on BERT blocks (extra positional arguments) and refits
    a pair's layers in their form (same index, same shapes). In the first block, query, key
    and value see the same inputs on both paths, so they are unchanged (fc1 is not: it
    comes after the attention output); a ``cols`` layer reads the block's compressed
    layers, and its refit is the least-squares fit: its error against the original layer's
    output on the calibration tokens drops, and no small change of its factors lowers it
    further."""
    from mixrank.compress.refine import sequential_refit

    model = Encoder(layers=2)
    batches = _batches(n=6)
    names, calib = _stats(model, batches)
    spectra = pair_spectra(find_pairs(model, names), model, calib.layers, damping=1e-2)
    fits = {n: closed_form_fit(s, max(1, s.max_rank // 3)) for n, s in spectra.items()}

    def no_lowrank(*_a):
        raise AssertionError("every layer is paired")

    new = sequential_refit(model, names, batches, no_lowrank, 1e-9, progress=False, current=fits,
                           token_mask="attention_mask")
    assert new is not None and set(new) == set(fits)
    for n, f in fits.items():
        g = new[n]
        assert g.form == f.form and torch.equal(g.index, f.index) and (g.bias is None) == (f.bias is None)
        assert g.A.shape == f.A.shape and g.B.shape == f.B.shape
    first = "bert.encoder.layer.0."
    for n in ("attention.self.query", "attention.self.key", "attention.self.value"):
        f, g = fits[first + n], new[first + n]
        assert torch.allclose(g.B, f.B, atol=1e-4 * float(f.B.abs().max())), n
    # value/output's output projection: its input on the compressed path has q, k and v compressed
    name = first + "attention.output.dense"
    comp = _with_fits(model, {n: fits[n] for n in fits if n.startswith(first) and fits[n].form == "rows"})
    X_o, X_c = _capture(model, name, batches), _capture(comp, name, batches)
    lin = model.get_submodule(name)
    Y = X_o @ lin.weight.double().T

    def err(A, delta):
        return float(((Y - X_c[:, fits[name].index] @ A.T - delta) ** 2).sum())

    before = err(fits[name].A.double(), fits[name].bias.double() if fits[name].bias is not None else 0.0)
    assert new[name].bias is None  # value/output stores no bias delta: the refit adds none
    A, d = new[name].A.double(), 0.0
    after = err(A, d)
    assert after < 0.7 * before, (before, after)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the optimum: random small moves only add error
        dA = torch.randn(A.shape, generator=g, dtype=A.dtype) * 1e-3 * float(A.abs().mean())
        assert err(A + dA, d) >= after * (1 - 1e-9)
