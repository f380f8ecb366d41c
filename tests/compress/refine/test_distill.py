"""End-to-end distillation of the factors (the last refinement)."""

import pytest
import torch

from mixrank.compress import CompressConfig, MixrankError, apply_factors, compress_model
from mixrank.compress.calibrate import split_holdout
from mixrank.compress.factor import LayerFit
from mixrank.compress.factor.sparse import SparseTerm
from mixrank.compress.refine import distill
from mixrank.compress.score import output_error, output_loss

pytestmark = pytest.mark.slow  # distillation on the trained digits model


def _fits(f):
    """The LayerFits stored in a Factors."""
    out = {}
    for n in f.factored_layers():
        sp = f.layers[n]["sparse"]
        term = None if sp["structure"] == "none" else SparseTerm(
            sp["structure"], f.tensors[f"{n}.sparse_index"].long(), f.tensors[f"{n}.sparse_value"])
        out[n] = LayerFit(f.tensors[f"{n}.A"], f.tensors[f"{n}.B"], term, f.layers[n]["nmse"], [])
    return out


def _held_error(model, fits, held):
    import copy

    from mixrank.compress.artifact import factored_from_fit, set_module
    small = copy.deepcopy(model)
    for n, f in fits.items():
        set_module(small, n, factored_from_fit(f, small.get_submodule(n)))
    with torch.no_grad():
        errs = [output_error(small(x), model(x), "mse") * len(x) for x in held]
    return sum(errs) / sum(len(x) for x in held)


@pytest.fixture(scope="module")
def closed_form(digits):
    x = digits["xtr"][:384]
    calib = [x[i:i + 64] for i in range(0, 384, 64)]
    f = compress_model(digits["model"], calib,
                       CompressConfig(keep=0.3, sparse="row", sparse_splits=1, sequential=False,
                                      compensate_steps=0, distill_steps=0, search_evals=40),
                       progress=False)
    train, held = split_holdout(calib, 0.5)
    return f, train, held


def test_distillation_lowers_the_held_out_error(digits, closed_form):
    f, train, held = closed_form
    start = _fits(f)
    out, rec = distill(digits["model"], start, train, held, "auto", 80, 1e-3, progress=False)
    before = _held_error(digits["model"], start, held)
    after = _held_error(digits["model"], out, held)
    assert rec["held_start"] == pytest.approx(before, rel=1e-4)
    assert rec["held_best"] == pytest.approx(after, rel=1e-4)  # the record is what ships
    assert after < 0.8 * before, (before, after)
    for n, fit in out.items():  # shapes and supports fixed; only values move
        assert fit.A.shape == start[n].A.shape and fit.B.shape == start[n].B.shape
        if fit.sparse is not None:
            assert torch.equal(fit.sparse.index, start[n].sparse.index)


def test_distillation_never_ends_worse_than_it_started(digits, closed_form):
    f, train, held = closed_form
    start = _fits(f)
    # a step size that can only overshoot: nothing beats the start, so the start ships
    out, rec = distill(digits["model"], start, train, held, "auto", 30, 50.0, progress=False,
                       max_backoffs=0)
    assert rec["best_step"] == 0 and rec["held_best"] == rec["held_start"]
    for n in start:
        assert torch.equal(out[n].A, start[n].A) and torch.equal(out[n].B, start[n].B)


@pytest.mark.parametrize("metric", ["auto", "kl"])
def test_distillation_in_pieces_follows_the_same_path(digits, closed_form, monkeypatch, metric):
    """A step's batch split into pieces (large models: less activation memory) sums the
    same gradients, so the distillation takes the same path; and the original model's
    parameters, shared with the student, come back untouched with their flags."""
    import mixrank.compress.refine._distill as d

    f, train, held = closed_form
    model = digits["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    _, whole = distill(model, _fits(f), train, held, metric, 20, 1e-3, progress=False)
    monkeypatch.setattr(d, "CHUNK_TOKENS", 5 * 17)  # 64-row batches of 17 tokens: 13 pieces each
    _, pieces = distill(model, _fits(f), train, held, metric, 20, 1e-3, progress=False, tokens_per_sample=17)
    assert pieces["steps"] == whole["steps"] and pieces["best_step"] == whole["best_step"]
    assert pieces["held_best"] == pytest.approx(whole["held_best"], rel=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_output_loss_matches_the_scoring_metric():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 10, generator=g)
    y = ref + 1e-3 * torch.randn(16, 10, generator=g)
    for metric in ("kl", "mse", "cosine", "auto"):
        assert float(output_loss(y, ref, metric)) == pytest.approx(output_error(y, ref, metric), rel=1e-6)
    # a tiny KL survives (float32 would drown it in rounding noise)
    tiny = ref + 1e-5 * torch.randn(16, 10, generator=g, dtype=torch.float64)
    kl = float(output_loss(tiny, ref.double(), "kl"))
    assert 0 < kl < 1e-9


def test_default_pipeline_runs_distillation_behind_the_guard(tiny_vit):
    calib = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    f = compress_model(tiny_vit, calib, CompressConfig(keep=0.4, search_evals=20, distill_steps=40),
                       progress=False)
    ref = f.plan["allocation"]["refinement"]
    dist = [v for v in ref["variants"] if v["name"].endswith("+distill")]
    assert len(dist) == 1 and dist[0]["steps"] > 0
    assert dist[0]["held_best"] <= dist[0]["held_start"]
    assert ref["score"] <= ref["variants"][0]["score"]
    small = apply_factors(tiny_vit, f)  # what ships loads and runs
    with torch.no_grad():
        assert torch.isfinite(small(calib[0])).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"distill_steps": -1}, "distill_steps"), ({"distill_lr": 0.0}, "distill_lr"),
    ({"distill_seconds": 0}, "distill_seconds"),
])
def test_bad_distillation_settings_fail_before_any_work(kwargs, match):
    with pytest.raises(MixrankError, match=match):
        CompressConfig(**kwargs)
