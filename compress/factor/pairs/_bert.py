"""Pairs of Hugging Face BERT-style encoders (BERT, RoBERTa, MiniLM, ...)."""

from __future__ import annotations

from ._base import PAIRINGS, Pair, Pairing, is_linear


@PAIRINGS.register("bert")
class BertPairing(Pairing):
    """Hugging Face BERT-style encoders (BERT, RoBERTa, MiniLM, ...): ``attention.self``
    with ``query``/``key``/``value`` and ``attention.output.dense``; ``intermediate.dense``
    → ``output.dense``. Only absolute position embeddings: relative ones add a term in q
    that the bilinear form does not see."""

    def find(self, model):
        pairs = []
        for name, mod in model.named_modules():
            pre = f"{name}." if name else ""
            att = getattr(mod, "attention", None)
            sa = getattr(att, "self", None)
            if sa is not None and all(is_linear(sa, a) for a in ("query", "key", "value")) \
                    and hasattr(sa, "num_attention_heads") and hasattr(sa, "attention_head_size") \
                    and getattr(sa, "position_embedding_type", "absolute") == "absolute":
                h, d = int(sa.num_attention_heads), int(sa.attention_head_size)
                if sa.query.out_features == sa.key.out_features == sa.value.out_features == h * d:
                    pairs.append(Pair("qk", f"{pre}attention.self.query", f"{pre}attention.self.key", h, d))
                    out = getattr(att, "output", None)
                    if is_linear(out, "dense") and out.dense.in_features == h * d:
                        pairs.append(Pair("vo", f"{pre}attention.self.value", f"{pre}attention.output.dense", h, d))
            inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
            if is_linear(inter, "dense") and is_linear(out, "dense") and \
                    inter.dense.out_features == out.dense.in_features:
                pairs.append(Pair("mlp", f"{pre}intermediate.dense", f"{pre}output.dense"))
        return pairs
