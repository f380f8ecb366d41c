import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    """The trained digits ViT (trained once, cached under MIXRANK_CACHE) and its data."""
    from mixrank._demo import accuracy, digits_data, digits_vit

    torch.manual_seed(0)
    model = digits_vit(progress=False)
    xtr, ytr, xte, yte = digits_data()
    acc = accuracy(model, xte, yte)
    assert acc >= 0.96, f"the digits ViT should train to ~97-98 %, got {acc:.3f}"
    return {"model": model, "xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "acc": acc}


@pytest.fixture
def tiny_vit():
    """A random-weight timm ViT with the real block structure, small enough for unit tests."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64,
                             depth=2, num_heads=2).eval()


class TinyTextModel(torch.nn.Module):
    """A tiny text transformer taking input_ids and attention_mask, with Linear q/k/v."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([TinyTextBlock(d) for _ in range(2)])
        self.head = torch.nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        for blk in self.layers:
            h = blk(h, attention_mask)
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


class TinyTextBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, h, mask):
        att = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        att = att.masked_fill(~mask.bool()[:, None, :], -1e9).softmax(-1)
        h = h + self.o(att @ self.v(h))
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


@pytest.fixture
def text_model():
    torch.manual_seed(0)
    return TinyTextModel().eval()
