"""A text transformer through the public API: a small random `transformers.BertModel`
with dict batches of padded token ids and ``token_mask`` (CI needs no pretrained weights;
benchmarks/quality.py runs the real MiniLM)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mixrank.compress import CompressConfig, apply_factors, compress_model  # noqa: E402


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _batches(pad_id: int = 0, n: int = 8, size: int = 8, seed: int = 1) -> list[dict]:
    """Dict batches of variable-length texts, padded with ``pad_id`` to the longest."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(4, 24, (size,), generator=g)
        ids = torch.full((size, int(lengths.max())), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n_tok in enumerate(lengths.tolist()):
            ids[i, :n_tok] = torch.randint(5, 120, (n_tok,), generator=g)
            mask[i, :n_tok] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _real_token_error(model, small, batches) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].bool()
            ref, out = model(**b).last_hidden_state[m], small(**b).last_hidden_state[m]
            num += float(((ref - out) ** 2).sum())
            den += float((ref**2).sum())
    return num / den


def test_bert_with_dict_batches_and_token_mask():
    model = _bert()
    calib = _batches()
    f = compress_model(model, calib, CompressConfig(keep=0.5, include=["encoder.*"], token_mask="attention_mask",
                                                   effort="fast"), progress=False)
    layers = f.plan.layers
    assert len(layers) == 12 and all(n.startswith("encoder.layer.") for n in layers)
    from mixrank.compress.calibrate import split_holdout

    stats_part = split_holdout(calib, f.plan.config["holdout"])[0]  # the batches the statistics sum
    real = sum(int(b["attention_mask"].sum()) for b in stats_part)
    assert {r.tokens for r in layers.values()} == {real}, "padding tokens must not be counted"
    assert f.plan.totals.params_after <= 0.5 * f.plan.totals.params_before * 1.02
    small = apply_factors(model, f)
    held = _batches(seed=7)
    err = _real_token_error(model, small, held)
    plain = compress_model(model, calib, CompressConfig(method="svd", keep=0.5, include=["encoder.*"],
                                                       token_mask="attention_mask"), progress=False)
    assert err < _real_token_error(model, apply_factors(model, plain), held)
    assert err < 0.5


def test_padding_content_does_not_change_the_factors():
    """Padded positions are masked out of the statistics and of every score: what the
    padding holds cannot change the result."""
    model = _bert()
    cfg = dict(keep=0.5, include=["encoder.*"], token_mask="attention_mask", effort="balanced",
               distill_steps=20, search_evals=20)
    a = compress_model(model, _batches(pad_id=0), CompressConfig(**cfg), progress=False)
    b = compress_model(model, _batches(pad_id=3), CompressConfig(**cfg), progress=False)
    assert {n: r.rank for n, r in a.plan.layers.items()} == {n: r.rank for n, r in b.plan.layers.items()}
    for k, t in a.tensors.items():
        assert torch.allclose(t, b.tensors[k], rtol=1e-4, atol=1e-6), k
