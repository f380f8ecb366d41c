"""Small random Hugging Face model folders, built offline: a BERT text encoder with a
WordPiece tokenizer whose vocabulary is the words of the shipped calibration texts, and a
ViT image classifier with its image processor. What a user's ``save_pretrained`` folder
holds (config.json, model.safetensors, tokenizer or preprocessor files), at a size the
tests run in seconds."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab(size: int = 600) -> list[str]:
    text = resources.files("mixrank").joinpath("data", "texts_calibration.txt").read_text(encoding="utf-8")
    counts: dict[str, int] = {}
    for w in re.findall(r"[a-z]+", text.lower()):
        counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: -counts[w])
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-_*`/"))
    pieces = chars + [f"##{c}" for c in chars if c.isalnum()]
    return (SPECIAL + pieces + [w for w in words if w not in pieces])[:size]


def bert_folder(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
                classifier: bool = False) -> Path:
    """A random BERT (``BertModel``, or ``BertForSequenceClassification`` with 3 labels) with
    its tokenizer, saved to ``path``."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True, model_max_length=256)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=256, num_labels=3)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def vit_folder(path: Path, image_size: int = 32, patch: int = 8, hidden: int = 32, layers: int = 2,
               labels: int = 3, seed: int = 0) -> Path:
    """A random ``ViTForImageClassification`` with its image processor, saved to ``path``."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=2, intermediate_size=4 * hidden, num_labels=labels)
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
