"""The rewrite on a graph that optimum exported (not mixrank): MiniLM exported by
``optimum.exporters.onnx.main_export`` (task feature-extraction: inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` with dynamic batch and sequence axes, output
``last_hidden_state``), rewritten with a factors file that ``mixrank compress --model
minilm`` wrote, and compared on onnxruntime with the factored PyTorch encoder.

optimum does not install beside mixrank's transformers (optimum-onnx 0.1.0 pins
transformers < 4.58); run it with optimum in its own folder on PYTHONPATH::

    pip install --target /tmp/optpkgs --no-deps "transformers<4.58" "optimum~=2.1.0" \\
        optimum-onnx==0.1.0 "tokenizers<0.23" "huggingface_hub<1.0" requests urllib3 idna \\
        certifi charset_normalizer
    PYTHONPATH=/tmp/optpkgs python benchmarks/optimum_rewrite.py FACTORS [--out DIR]

Prints which layers matched (by name or by weight fingerprint) and the largest difference
between the rewritten graph and the factored model, on the shipped evaluation texts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("factors", help="a factors file of mixrank compress --model minilm")
    ap.add_argument("--out", default="optimum-out")
    args = ap.parse_args()
    import optimum
    import transformers
    from optimum.exporters.onnx import main_export

    from mixrank._hf import hf_folder, load_hf
    from mixrank._texts import read_texts, text_batches
    from mixrank.compress import apply_factors, load_factors
    from mixrank.exporter import rewrite_onnx, run_onnxruntime

    out = Path(args.out)
    folder = hf_folder("minilm")
    main_export(str(folder), output=str(out / "optimum"), task="feature-extraction", opset=17,
                do_validation=True, library_name="transformers")
    f = load_factors(args.factors)
    rep = rewrite_onnx(out / "optimum" / "model.onnx", f, out / "optimum.compressed.onnx")
    hf = load_hf(folder)
    small = apply_factors(hf.model, f).eval()
    texts = read_texts(None, "evaluation").texts[:128]
    batches, _ = text_batches(hf.processor, texts, hf.input_names, 128)
    worst, cos = 0.0, []
    for b in batches:
        got = run_onnxruntime(out / "optimum.compressed.onnx", {k: v.numpy() for k, v in b.items()})[0]
        with torch.no_grad():
            ref = small.bert(**b).last_hidden_state.numpy()
        m = b["attention_mask"].numpy().astype(bool)
        worst = max(worst, float(np.abs(got[m] - ref[m]).max()))
        a, c = got[m].reshape(-1), ref[m].reshape(-1)
        cos.append(float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c))))
    by = {}
    for r in rep.rewritten:
        by[r.get("matched_by", "name")] = by.get(r.get("matched_by", "name"), 0) + 1
    print(json.dumps({"optimum": optimum.__version__ if hasattr(optimum, "__version__") else "2.x",
                      "transformers": transformers.__version__, "rewritten": len(rep.rewritten),
                      "matched_by": by, "unmatched_factors": rep.unmatched_factors, "dense": len(rep.dense),
                      "texts": len(texts), "max_abs_real_tokens": worst, "min_cosine": min(cos)}, indent=1))


if __name__ == "__main__":
    main()
