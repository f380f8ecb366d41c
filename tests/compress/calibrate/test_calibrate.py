import pytest
import torch

from mixrank.compress import MixrankError, collect_stats, select_layers


def _inputs_of(model, name, run):
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        run()
    h.remove()
    return seen


def test_gram_equals_stacked_inputs(tiny_vit):
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    layers = select_layers(tiny_vit)
    calib = collect_stats(tiny_vit, layers, batches, progress=False)
    assert calib.batches == 3 and calib.samples == 12
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2"):
        xs = _inputs_of(tiny_vit, name, lambda: [tiny_vit(b) for b in batches])
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        st = calib.layers[name]
        assert st.gram.dtype == torch.float64
        assert st.tokens == X.shape[0] == 12 * 17  # 16 patches + class token
        torch.testing.assert_close(st.gram, X.T @ X, rtol=1e-10, atol=1e-8)


def test_dict_batches_and_token_mask(text_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    batch = {"input_ids": ids, "attention_mask": mask}
    layers = select_layers(text_model)
    assert "head" not in layers and "layers.0.q" in layers
    full = collect_stats(text_model, layers, [batch], progress=False)
    masked = collect_stats(text_model, layers, [batch], token_mask="attention_mask",
                           progress=False)
    assert full.layers["layers.0.q"].tokens == 21
    assert masked.layers["layers.0.q"].tokens == 13
    xs = _inputs_of(text_model, "layers.1.fc1", lambda: text_model(**batch))
    X = xs[0][mask.bool()].double()
    torch.testing.assert_close(masked.layers["layers.1.fc1"].gram, X.T @ X)


def test_tuple_batches(text_model):
    ids = torch.randint(0, 50, (2, 5))
    calib = collect_stats(text_model, ["layers.0.v"], [(ids, torch.ones(2, 5))], progress=False)
    assert calib.layers["layers.0.v"].tokens == 10


def test_nan_input_names_the_layer(tiny_vit):
    tiny_vit.blocks[1].norm2.weight.data[0] = float("nan")
    with pytest.raises(MixrankError, match=r"blocks\.1\.mlp\.fc1.*NaN"):
        collect_stats(tiny_vit, select_layers(tiny_vit), [torch.randn(2, 3, 32, 32)],
                      progress=False)


def test_empty_calibration(tiny_vit):
    with pytest.raises(MixrankError, match="empty"):
        collect_stats(tiny_vit, select_layers(tiny_vit), [], progress=False)


def test_bypassed_linear_is_reported():
    # nn.MultiheadAttention reads out_proj.weight directly: its forward never runs.
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(MixrankError, match="received no input"):
        collect_stats(M(), ["mha.out_proj"], [torch.randn(2, 4, 16)], progress=False)
