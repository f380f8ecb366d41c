"""Hostile inputs through the real command line, one subprocess per case.

Each case asserts the exit code (2: a user or environment error), that stderr is exactly
one line naming the problem (no traceback), and that no output was left behind. Exit 70
is reserved for bugs in mixrank; a property test feeds every subcommand garbage and
asserts that none exits 70.

``MIXRANK_BAD_INPUT_CMD`` replaces the command (default: this Python, ``-m mixrank``),
so the same table can be run against another version.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow  # ~70 subprocesses of the real CLI

CLI = shlex.split(os.environ.get("MIXRANK_BAD_INPUT_CMD", f"{shlex.quote(sys.executable)} -m mixrank"))
EXIT_USER = 2


@dataclass
class Case:
    name: str
    args: list[str]
    message: str  # a phrase the one stderr line must contain
    absent: list[str] = field(default_factory=list)  # paths that must not exist afterwards
    code: int = EXIT_USER
    fsize_limit: int | None = None  # RLIMIT_FSIZE in bytes: a full disk, as the writer sees it


def external_data_fixtures(src: Path, d: Path) -> None:
    """``src`` saved with its weights in ``w.bin`` (``ext.onnx``) and in ``out2.onnx.data``
    (``ext2.onnx``, the weights file an output ``out2.onnx`` would have), and a folder where
    ``dirout.onnx``'s weights file would go."""
    import onnx

    for name, loc in (("ext.onnx", "w.bin"), ("ext2.onnx", "out2.onnx.data")):
        onnx.save_model(onnx.load(str(src)), str(d / name), save_as_external_data=True, location=loc,
                        size_threshold=0)
    (d / "dirout.onnx.data").mkdir()


def forged_shapes(src: Path, d: Path) -> None:
    """``src`` with its first weight forged: a huge declared shape over its few bytes
    (``huge.onnx``), its raw bytes cut to 10 (``rawcut.onnx``), a negative dimension
    (``negdim.onnx``). onnx loads all three."""
    import copy

    import onnx

    model = onnx.load(str(src))
    for name, dims, cut in (("huge", [10**12, 10**12], None), ("rawcut", None, 10), ("negdim", [-5, 16], None)):
        m = copy.deepcopy(model)
        t = next(t for t in m.graph.initializer if len(t.dims) == 2)
        if dims is not None:
            del t.dims[:]
            t.dims.extend(dims)
        if cut is not None:
            t.raw_data = t.raw_data[:cut]
        onnx.save(m, str(d / f"{name}.onnx"))


def forged_factors(d: Path, model) -> None:
    """Factors files that parse and whose digest matches (recomputed, as a forger would), but
    that are not what their plan says; each ``forged_<what>.safetensors``."""
    import json

    from safetensors.torch import save_file

    from mixrank.compress import weight_fingerprint
    from mixrank.compress.artifact._factors import DIGEST_KEY, PLAN_KEY, _digest

    def layer(name, r=4, **kw):
        W = model.get_submodule(name).weight.detach()
        return {"shape": list(W.shape), "rank": r, "dense": False, "sha256": weight_fingerprint(W), **kw}

    def good():
        U, S, Vh = torch.linalg.svd(model.get_submodule("0").weight.detach().double(), full_matrices=False)
        return {"0.A": (U[:, :4] * S[:4]).float().contiguous(), "0.B": Vh[:4].float().contiguous()}

    def write(what, layers, tensors, version=2):
        plan = json.dumps({"format_version": version, "layers": layers}, sort_keys=True, separators=(",", ":"))
        save_file(tensors, str(d / f"forged_{what}.safetensors"),
                  metadata={PLAN_KEY: plan, DIGEST_KEY: _digest(plan, tensors)})

    t = good()
    write("nan", {"0": layer("0")}, {**t, "0.A": t["0.A"].clone().index_fill_(0, torch.tensor([3]), float("nan"))})
    write("rank8", {"0": layer("0", 8)}, t)
    write("form", {"0": layer("0", form="zigzag")}, t, 4)
    write("int64", {"0": layer("0")}, {**t, "0.A": t["0.A"].long()})
    write("version_true", {"0": layer("0")}, t, True)
    write("layers_list", [layer("0")], t)
    write("layer_string", {"0": "lowrank"}, t)
    write("missing_b", {"0": layer("0")}, {"0.A": t["0.A"]})
    write("int3", {"0": layer("0", precision="int3")}, t)
    write("rank_null", {"0": layer("0", None)}, t)
    write("rank_text", {"0": layer("0", "4")}, t)
    write("int8_floats", {"0": layer("0", precision="int8")}, t, 4)
    write("sparse", {"0": layer("0", sparse={"structure": "zigzag", "k": 2})}, t)
    rows = {"0.B": t["0.B"]}  # a pair's rows layer: rank output rows of B and their index
    for what, idx in (("index_negative", [0, 1, 2, -1]), ("index_repeated", [0, 1, 1, 2]),
                      ("index_past", [0, 1, 2, 99])):
        write(what, {"0": layer("0", form="rows", pair="qk:0+2")},
              {**rows, "0.index": torch.tensor(idx, dtype=torch.int32)}, 4)


def _fixtures(d: Path) -> None:
    """Every input file the cases use, in folder ``d``."""
    from PIL import Image
    from safetensors.torch import save_file

    from mixrank.compress import Factors, save_factors, weight_fingerprint

    def mlp(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()

    def factors_of(model):
        tensors, layers = {}, {}
        for name in ("0", "2"):
            W = model.get_submodule(name).weight.detach()
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            r = 4
            tensors[f"{name}.A"], tensors[f"{name}.B"] = (U[:, :r] * S[:r]).float(), Vh[:r].float()
            layers[name] = {"shape": list(W.shape), "rank": r, "dense": False, "sha256": weight_fingerprint(W)}
        return Factors(tensors, {"format_version": 2, "layers": layers})

    a, b = mlp(0), mlp(1)  # b: the same architecture and names, other weights (a fine-tuned sibling)
    for model, name in ((a, "m.onnx"), (b, "sibling.onnx")):
        torch.onnx.export(model, (torch.randn(2, 16),), str(d / name), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    save_factors(factors_of(a), d / "f.safetensors")
    forged_factors(d, a)
    external_data_fixtures(d / "m.onnx", d)
    forged_shapes(d / "m.onnx", d)
    (d / "garbage.onnx").write_bytes(b"\x08\x07not a model at all")
    raw = (d / "m.onnx").read_bytes()
    (d / "trunc.onnx").write_bytes(raw[: len(raw) // 2])
    (d / "text.safetensors").write_text("not safetensors")
    save_file({"x": torch.zeros(2)}, str(d / "plain.safetensors"))
    tampered = bytearray((d / "f.safetensors").read_bytes())
    tampered[-2] ^= 0xFF
    (d / "tampered.safetensors").write_bytes(bytes(tampered))
    os.mkfifo(d / "fifo")
    (d / "adir").mkdir()
    (d / "afile").write_text("a file, not a folder")
    # reports
    for name, body in (("list.json", "[1, 2]"), ("string.json", '"report"'), ("null.json", '{"summary": null}'),
                       ("noschema.json", '{"summary": {"param_ratio": 0.4}}'),
                       ("future.json", '{"schema_version": 99, "summary": {}}'),
                       ("manifest.json", '{"stages": {}, "artifacts": {}}'), ("broken.json", "{not json")):
        (d / name).write_text(body)
    (d / "latin1.json").write_bytes(b'{"summary": "\xe9t\xe9"}')
    for name, v in (("strmeasure.json", "0.3"), ("listmeasure.json", [0.3]), ("boolmeasure.json", True)):
        (d / name).write_text(json.dumps({"schema_version": 1, "summary": {"param_ratio": v}}))
    (d / "superscript.toml").write_text('min_speedup = { "\u00b2" = 1.2 }\n', encoding="utf-8")
    (d / "ok.json").write_text(json.dumps({"schema_version": 1, "summary": {"param_ratio": 0.4}}))
    # budgets
    for name, body in (("nan.toml", "max_param_ratio = nan\n"), ("inf.toml", "min_cosine = inf\n"),
                       ("section.toml", "max_param_ratio = 0.5\n\n[min_speedup_typo]\n32 = 1.2\n"),
                       ("unknown.toml", "max_parms = 0.5\n"), ("bool.toml", "max_param_ratio = true\n"),
                       ("empty.toml", ""), ("badsyntax.toml", "max_param_ratio = = 1\n"),
                       ("ok.toml", "max_param_ratio = 0.5\n"), ("batchkey.toml", "min_speedup = { x = 1.2 }\n")):
        (d / name).write_text(body)
    (d / "latin1.toml").write_bytes(b"max_param_ratio = 0.5 # \xe9\n")
    # configs
    (d / "conf_bad.toml").write_text("[budget\nkeep = 0.4\n")
    (d / "conf_unknown.toml").write_text("kep = 0.4\n")
    (d / "conf_ignored.toml").write_text('method = "whiten"\n[refine]\ndistill_steps = 5\n')
    # images
    (d / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 20, 200)).save(d / "imgs" / f"{i}.png")
    (d / "bomb").mkdir()
    Image.new("L", (7000, 7000)).save(d / "bomb" / "huge.png", optimize=True)  # 49 Mpixel, a small file
    (d / "giant").mkdir()  # a PNG header declaring 400 Mpixel: past PIL's own guard, which would speak first
    (d / "giant" / "giant.png").write_bytes(_png_header(20000, 20000))
    (d / "broken_imgs").mkdir()
    (d / "broken_imgs" / "a.png").write_bytes(b"\x89PNG broken")
    (d / "empty_imgs").mkdir()
    # csv
    (d / "labels_empty.csv").write_text("imgs/0.png,\n")
    (d / "labels_word.csv").write_text("imgs/0.png,3\nimgs/1.png,cat\n")
    (d / "labels_missing.csv").write_text("nowhere/0.png,1\nnowhere/1.png,2\n")
    (d / "labels_short.csv").write_text("imgs/0.png\n")
    (d / "labels_superscript.csv").write_text("imgs/0.png,\u00b2\nimgs/1.png,1\n", encoding="utf-8")
    (d / "labels_nul.csv").write_text("imgs/0.png,1\x00\nimgs/1.png,1\n")
    (d / "labels_huge.csv").write_text("imgs/0.png," + "9" * 200_000 + "\nimgs/1.png,1\n")
    # arrays
    np.save(d / "inputs_bad.npy", np.zeros((4, 5), np.float32))
    np.save(d / "inputs_ok.npy", np.zeros((4, 16), np.float32))
    np.save(d / "labels_bad.npy", np.zeros(7, np.int64))
    _text_fixtures(d)


def _png_header(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` and holds no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def _text_fixtures(d: Path) -> None:
    """Hugging Face folders (a small random BERT, a larger one, broken folders) and
    hostile text files."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_folders import bert_folder

    bert_folder(d / "bert")
    bert_folder(d / "bert_big", hidden=64)
    (d / "noconfig").mkdir()
    (d / "noconfig" / "model.safetensors").write_bytes(b"")
    (d / "noweights").mkdir()
    (d / "noweights" / "config.json").write_text('{"model_type": "bert"}')
    (d / "empty.txt").write_text("")
    (d / "ok_texts.txt").write_text("A sentence to calibrate on.\nAnother one.\n")
    (d / "blank.txt").write_text("\n  \n\t\n")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (d / "huge_line.txt").write_text("word " * 220_000)  # one 1.1 MB line
    (d / "notext.jsonl").write_text('{"sentence": "a"}\n{"label": 1}\n')
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "notnpy.npy").write_text("nope")
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "inputs_nan.npy", np.full((4, 16), np.nan, np.float32))
    for name, body in (("conf_keep_text.toml", 'keep = "0.4"\n'),
                       ("conf_block_float.toml", "[quantize]\nblock = 32.0\n"),
                       ("conf_budget_scalar.toml", "budget = 5\n"),
                       ("conf_seconds_text.toml", 'method = "svd"\nmax_seconds = "5"\n'),
                       ("conf_widths.toml", '[quantize]\nwidths = ["int3"]\n')):
        (d / name).write_text(body)


CASES = [
    # foreign, tampered and unreadable inputs to the rewriter
    Case("rewrite foreign factors by name", ["rewrite", "sibling.onnx", "f.safetensors", "-o", "o.onnx"],
         "differs from the one the factors were computed from", ["o.onnx"]),
    Case("rewrite garbage onnx", ["rewrite", "garbage.onnx", "f.safetensors", "-o", "o.onnx"],
         "not a readable ONNX model", ["o.onnx"]),
    Case("rewrite truncated onnx", ["rewrite", "trunc.onnx", "f.safetensors", "-o", "o.onnx"], "ONNX", ["o.onnx"]),
    Case("rewrite missing onnx", ["rewrite", "nope.onnx", "f.safetensors", "-o", "o.onnx"], "does not exist",
         ["o.onnx"]),
    Case("rewrite missing factors", ["rewrite", "m.onnx", "nope.safetensors", "-o", "o.onnx"], "does not exist",
         ["o.onnx"]),
    Case("rewrite text factors", ["rewrite", "m.onnx", "text.safetensors", "-o", "o.onnx"],
         "not a readable safetensors", ["o.onnx"]),
    Case("rewrite plain safetensors", ["rewrite", "m.onnx", "plain.safetensors", "-o", "o.onnx"],
         "not a mixrank factors file", ["o.onnx"]),
    Case("rewrite tampered factors", ["rewrite", "m.onnx", "tampered.safetensors", "-o", "o.onnx"],
         "has been modified", ["o.onnx"]),
    Case("rewrite with another pinned digest", ["rewrite", "m.onnx", "f.safetensors", "-o", "o.onnx",
                                                "--require-digest", "0" * 64], "is not the pinned file", ["o.onnx"]),
    Case("rewrite with a malformed digest", ["rewrite", "m.onnx", "f.safetensors", "-o", "o.onnx",
                                             "--require-digest", "abc"], "takes a SHA-256", ["o.onnx"]),
    Case("rewrite with a digest file of garbage", ["rewrite", "m.onnx", "f.safetensors", "-o", "o.onnx",
                                                   "--require-digest", "ok.toml"], "does not start with a SHA-256",
         ["o.onnx"]),
    Case("inspect with another pinned digest", ["inspect", "m.onnx", "--require-digest", "1" * 64],
         "is not the pinned file"),
    Case("eval a pinned digest without factors", ["eval", "--require-digest", "1" * 64], "give one"),
    Case("rewrite to a name past the file system's", ["rewrite", "m.onnx", "f.safetensors", "-o", "x" * 300 + ".onnx"],
         "this file system allows 255"),
    Case("rewrite to a name with no room for its weights file", ["rewrite", "m.onnx", "f.safetensors", "-o",
                                                                 "x" * 250 + ".onnx"], "give at most 250"),
    Case("run into a folder name past the file system's", ["run", "--out", "y" * 300], "this file system allows 255"),
    Case("rewrite a huge declared shape", ["rewrite", "huge.onnx", "f.safetensors", "-o", "o.onnx"],
         "declares shape [1000000000000, 1000000000000]", ["o.onnx"]),
    Case("inspect a huge declared shape", ["inspect", "huge.onnx"], "truncated or forged"),
    Case("inspect truncated raw data", ["inspect", "rawcut.onnx"], "but holds 10 bytes"),
    Case("rewrite truncated raw data", ["rewrite", "rawcut.onnx", "f.safetensors", "-o", "o.onnx"],
         "but holds 10 bytes", ["o.onnx"]),
    Case("inspect a negative dimension", ["inspect", "negdim.onnx"], "negative dimension"),
    Case("bench a huge declared shape", ["bench", "huge.onnx", "m.onnx", "--out", "b"], "truncated or forged", ["b"]),
    Case("check a measurement given as text", ["check", "strmeasure.json", "ok.toml"], "is not a number ('0.3')"),
    Case("check a measurement given as a list", ["check", "listmeasure.json", "ok.toml"], "is not a number"),
    Case("check a measurement given as a boolean", ["check", "boolmeasure.json", "ok.toml"],
         "is not a number (True)"),
    Case("check a superscript batch size", ["check", "ok.json", "superscript.toml"], "is not a positive integer"),
    Case("check with a junit path under a file", ["check", "ok.json", "ok.toml", "--junit", "afile/j.xml"],
         "not a directory"),
    Case("rewrite onto a fifo", ["rewrite", "m.onnx", "f.safetensors", "-o", "fifo"], "not a regular file"),
    Case("rewrite onto /dev/null", ["rewrite", "m.onnx", "f.safetensors", "-o", "/dev/null"], "not a regular file"),
    Case("rewrite onto a folder", ["rewrite", "m.onnx", "f.safetensors", "-o", "adir"], "is a directory"),
    Case("rewrite onto its input", ["rewrite", "m.onnx", "f.safetensors", "-o", "m.onnx"], "is the input"),
    Case("rewrite onto the factors", ["rewrite", "m.onnx", "f.safetensors", "-o", "f.safetensors"], "is the input"),
    Case("rewrite into /proc", ["rewrite", "m.onnx", "f.safetensors", "-o", "/proc/mixrank.onnx"],
         "cannot write"),
    Case("rewrite into a read-only /sys", ["rewrite", "m.onnx", "f.safetensors", "-o", "/sys/kernel/x.onnx"],
         "cannot write"),
    Case("bench with a full disk", ["bench", "m.onnx", "m.onnx", "--out", "b", "--seconds", "0.5", "--batches", "1",
                                    "-q"], "cannot write", ["b"], fsize_limit=12000),
    Case("rewrite with a full disk", ["rewrite", "m.onnx", "f.safetensors", "-o", "o.onnx"], "cannot write",
         ["o.onnx"], fsize_limit=2048),
    Case("rewrite under a file", ["rewrite", "m.onnx", "f.safetensors", "-o", "afile/o.onnx"], "not a directory"),
    Case("rewrite unknown target", ["rewrite", "m.onnx", "f.safetensors", "-o", "o.onnx", "--target", "tpu"],
         "invalid choice", ["o.onnx"]),
    # the gate
    Case("check report is a list", ["check", "list.json", "ok.toml"], "not a mixrank report"),
    Case("check report is a string", ["check", "string.json", "ok.toml"], "not a mixrank report"),
    Case("check summary null", ["check", "null.json", "ok.toml"], "not a mixrank report"),
    Case("check report without schema", ["check", "noschema.json", "ok.toml"], "schema_version"),
    Case("check report of a future schema", ["check", "future.json", "ok.toml"], "schema version 99"),
    Case("check a manifest", ["check", "manifest.json", "ok.toml"], "not a mixrank report"),
    Case("check broken json", ["check", "broken.json", "ok.toml"], "not a JSON report"),
    Case("check non-UTF-8 report", ["check", "latin1.json", "ok.toml"], "not UTF-8"),
    Case("check an ONNX file", ["check", "m.onnx", "ok.toml"], "not a JSON report"),
    Case("check missing report", ["check", "nope.json", "ok.toml"], "does not exist"),
    Case("check nan limit", ["check", "ok.json", "nan.toml"], "finite number"),
    Case("check inf limit", ["check", "ok.json", "inf.toml"], "finite number"),
    Case("check non-UTF-8 budget", ["check", "ok.json", "latin1.toml"], "not UTF-8"),
    Case("check budget table line", ["check", "ok.json", "section.toml"], "section.toml:3: unknown key"),
    Case("check unknown budget key", ["check", "ok.json", "unknown.toml"], "unknown key 'max_parms'"),
    Case("check bool limit", ["check", "ok.json", "bool.toml"], "must be a number"),
    Case("check empty budget", ["check", "ok.json", "empty.toml"], "sets no limit"),
    Case("check budget syntax", ["check", "ok.json", "badsyntax.toml"], "not valid TOML"),
    Case("check batch key", ["check", "ok.json", "batchkey.toml"], "not a positive integer"),
    Case("check missing budget", ["check", "ok.json", "nope.toml"], "does not exist"),
    Case("check junit onto a folder", ["check", "ok.json", "ok.toml", "--junit", "adir"], "is a directory"),
    # inspect
    Case("inspect a string json", ["inspect", "string.json"], "not a mixrank report"),
    Case("inspect a list json", ["inspect", "list.json"], "not a mixrank report"),
    Case("inspect non-UTF-8 json", ["inspect", "latin1.json"], "not UTF-8"),
    Case("inspect unknown suffix", ["inspect", "ok.toml"], "cannot inspect"),
    Case("inspect missing", ["inspect", "nope.safetensors"], "does not exist"),
    Case("inspect garbage onnx", ["inspect", "garbage.onnx"], "not a readable ONNX model"),
    Case("inspect tampered factors", ["inspect", "tampered.safetensors"], "has been modified"),
    # bench and build
    Case("bench inputs of the wrong shape", ["bench", "m.onnx", "m.onnx", "--inputs", "inputs_bad.npy", "--out", "b",
                                             "--seconds", "1"], "the inputs have shape [4, 5]", ["b"]),
    Case("bench labels of the wrong length", ["bench", "m.onnx", "m.onnx", "--inputs", "inputs_ok.npy", "--labels",
                                              "labels_bad.npy", "--out", "b"], "has 7 labels", ["b"]),
    Case("bench not an npy", ["bench", "m.onnx", "m.onnx", "--inputs", "notnpy.npy", "--out", "b"],
         "cannot read notnpy.npy", ["b"]),
    Case("bench pickled npy", ["bench", "m.onnx", "m.onnx", "--inputs", "pickled.npy", "--out", "b"],
         "cannot read pickled.npy", ["b"]),
    Case("bench batches zero", ["bench", "m.onnx", "m.onnx", "--batches", "0", "--out", "b"],
         "positive batch sizes", ["b"]),
    Case("bench batches words", ["bench", "m.onnx", "m.onnx", "--batches", "one", "--out", "b"],
         "comma-separated integers", ["b"]),
    Case("bench out is a file", ["bench", "m.onnx", "m.onnx", "--out", "afile"], "is not a folder"),
    Case("rewrite onto the input's weights file", ["rewrite", "ext.onnx", "f.safetensors", "-o", "w.bin"],
         "the output w.bin is the external data of ext.onnx"),
    Case("rewrite over the input's weights file", ["rewrite", "ext2.onnx", "f.safetensors", "-o", "out2.onnx"],
         "out2.onnx.data is the external data of ext2.onnx", ["out2.onnx"]),
    Case("rewrite with a folder as its weights file", ["rewrite", "m.onnx", "f.safetensors", "-o", "dirout.onnx"],
         "dirout.onnx.data exists and is not a regular file", ["dirout.onnx"]),
    Case("compress bytes inf", ["compress", "--bytes", "inf", "-o", "f2.safetensors"], "--bytes must be a byte count",
         ["f2.safetensors"]),
    Case("compress bytes overflow", ["compress", "--bytes", "1e999", "-o", "f2.safetensors"],
         "--bytes must be a byte count", ["f2.safetensors"]),
    Case("compress seed past 64 bits", ["compress", "--keep", "0.4", "--seed", str(2**70), "-o", "f2.safetensors"],
         "seed must be an integer in [0, 2**63)", ["f2.safetensors"]),
    Case("compress config keep as text", ["compress", "--config", "conf_keep_text.toml", "-o", "f2.safetensors"],
         "keep must be a number, got '0.4'", ["f2.safetensors"]),
    Case("compress config block as float", ["compress", "--config", "conf_block_float.toml", "-o", "f2.safetensors"],
         "block must be one of", ["f2.safetensors"]),
    Case("compress config section as a number",
         ["compress", "--config", "conf_budget_scalar.toml", "-o", "f2.safetensors"],
         "[budget] is a section of settings", ["f2.safetensors"]),
    Case("compress config seconds as text", ["compress", "--config", "conf_seconds_text.toml", "-o", "f2.safetensors"],
         "max_seconds must be a number > 0 or None, got '5'", ["f2.safetensors"]),
    Case("compress config unknown width", ["compress", "--config", "conf_widths.toml", "-o", "f2.safetensors"],
         "widths must be a non-empty list", ["f2.safetensors"]),
    Case("bench seconds nan", ["bench", "m.onnx", "m.onnx", "--seconds", "nan", "--out", "b"],
         "max_seconds must be a number > 0, got nan", ["b"]),
    Case("bench seconds negative", ["bench", "m.onnx", "m.onnx", "--seconds", "-5", "--out", "b"],
         "max_seconds must be a number > 0, got -5.0", ["b"]),
    Case("bench inputs of NaN", ["bench", "m.onnx", "m.onnx", "--inputs", "inputs_nan.npy", "--out", "b", "--seconds",
                                 "1"], "values that are NaN or infinite", ["b"]),
    *[Case(f"inspect forged factors: {what}", ["inspect", f"forged_{what}.safetensors"], message)
      for what, message in (
          ("nan", "tensor 0.A holds 4 values that are NaN or infinite"),
          ("rank8", "layer 0: rank is 8 over factors of shapes [32, 4] and [4, 16]"),
          ("form", "layer 0: form is 'zigzag'"),
          ("int64", "layer 0: A is torch.int64"),
          ("version_true", "factors format version True"),
          ("layers_list", "Plan.layers must be dict"),
          ("layer_string", "the entry '0' must be an object"),
          ("missing_b", "layer 0: tensor 0.B is missing"),
          ("int3", "layer 0: precision is 'int3'"),
          ("rank_null", "layer 0: rank is None"),
          ("rank_text", "entry '0': LayerPlan.rank must be int | None, got '4'"),
          ("int8_floats", "layer 0: tensor 0.A.codes is missing (the plan says lowrank at int8)"),
          ("sparse", "layer 0: sparse structure is 'zigzag'"),
          ("index_negative", "layer 0: index holds -1..2, outside [0, 32)"),
          ("index_repeated", "layer 0: index repeats an entry"),
          ("index_past", "layer 0: index holds 0..99, outside [0, 32)"))],
    Case("rewrite forged factors", ["rewrite", "m.onnx", "forged_rank8.safetensors", "-o", "o.onnx"],
         "rank is 8 over factors", ["o.onnx"]),
    Case("bench garbage onnx", ["bench", "garbage.onnx", "m.onnx", "--out", "b"],
         "garbage.onnx is not a readable ONNX model", ["b"]),
    Case("build garbage onnx", ["build", "garbage.onnx", "-o", "e.ort.onnx"], "cannot load", ["e.ort.onnx"]),
    Case("build onto its input", ["build", "m.onnx", "-o", "m.onnx"], "is the input"),
    Case("build tensorrt not installed", ["build", "m.onnx", "-o", "e.engine", "--engine", "tensorrt"],
         "tensorrt", ["e.engine"]),
    # the main job and compress (built-in digits model)
    Case("run out is a file", ["run", "--out", "afile"], "is not a folder"),
    Case("run batches words", ["run", "--out", "r", "--batches", "abc"], "comma-separated integers", ["r"]),
    Case("run batches negative", ["run", "--out", "r", "--batches", "-1"], "positive batch sizes", ["r"]),
    Case("run keep out of range", ["run", "--out", "r", "--keep", "1.5"], "keep must be a fraction", ["r"]),
    Case("run latency without a unit", ["run", "--out", "r", "--latency", "0.5"], "--latency must be", ["r"]),
    Case("run latency at or above the original", ["run", "--out", "r", "--latency", "1.5x"], "in (0, 1)", ["r"]),
    Case("run latency with packed weights", ["run", "--out", "r", "--latency", "0.5x", "--int-weights", "packed"],
         "packed", ["r"]),
    Case("run keep and bytes", ["run", "--out", "r", "--keep", "0.4", "--bytes", "0.1x"], "not both", ["r"]),
    Case("run bytes garbage", ["run", "--out", "r", "--bytes", "lots"], "byte count or a fraction", ["r"]),
    Case("run auto precision with keep", ["run", "--out", "r", "--keep", "0.4", "--precision", "auto"],
         "bytes budget", ["r"]),
    Case("run negative calibration images", ["run", "--out", "r", "--calib-images", "-5"], "positive number", ["r"]),
    Case("run images with the built-in model", ["run", "--out", "r", "--images", "imgs"], "built-in digits", ["r"]),
    Case("run junit onto a folder", ["run", "--out", "r", "--junit", "adir"], "is a directory", ["r"]),
    Case("run into /proc", ["run", "--out", "/proc/mixrank-out"], "cannot"),
    Case("run config missing", ["run", "--out", "r", "--config", "nope.toml"], "does not exist", ["r"]),
    Case("run config bad toml", ["run", "--out", "r", "--config", "conf_bad.toml"], "not valid TOML", ["r"]),
    Case("run config unknown key", ["run", "--out", "r", "--config", "conf_unknown.toml"], "kep", ["r"]),
    Case("run config ignored setting", ["run", "--out", "r", "--config", "conf_ignored.toml"],
         "distill_steps=5 is ignored by method 'whiten'", ["r"]),
    Case("compress onto a folder", ["compress", "-o", "adir"], "is a directory"),
    Case("compress onto /dev/null", ["compress", "-o", "/dev/null"], "not a regular file"),
    Case("compress infeasible keep", ["compress", "--keep", "0.001", "-o", "c.safetensors"], "feasible range",
         ["c.safetensors"]),
    Case("compress unknown method", ["compress", "--method", "magic", "-o", "c.safetensors"], "unknown method",
         ["c.safetensors"]),
    Case("compress timm model without images", ["compress", "--model", "vit_tiny_patch16_224", "-o",
                                                "c.safetensors"], "needs calibration images", ["c.safetensors"]),
    Case("compress unknown timm model", ["compress", "--model", "vit_tiny_patch16_22", "-o", "c.safetensors"],
         "unknown timm model", ["c.safetensors"]),
    Case("compress decompression bomb", ["compress", "--model", "vit_tiny_patch16_224", "--images", "bomb", "-o",
                                         "c.safetensors"], "over the cap of 40 Mpixel", ["c.safetensors"]),
    Case("compress past PIL's own bomb guard", ["compress", "--model", "vit_tiny_patch16_224", "--images", "giant",
                                                "-o", "c.safetensors"], "20000x20000 = 400 Mpixel", ["c.safetensors"]),
    Case("compress only broken images", ["compress", "--model", "vit_tiny_patch16_224", "--images", "broken_imgs",
                                         "-o", "c.safetensors"], "no usable image", ["c.safetensors"]),
    Case("compress empty image folder", ["compress", "--model", "vit_tiny_patch16_224", "--images", "empty_imgs",
                                         "-o", "c.safetensors"], "no usable image", ["c.safetensors"]),
    Case("compress checkpoint missing", ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint", "nope.pth",
                                         "--images", "imgs", "-o", "c.safetensors"], "does not exist",
         ["c.safetensors"]),
    Case("compress checkpoint garbage", ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint",
                                         "garbage.onnx", "--images", "imgs", "-o", "c.safetensors"],
         "cannot read checkpoint", ["c.safetensors"]),
    Case("compress checkpoint of pickled objects", ["compress", "--model", "vit_tiny_patch16_224", "--checkpoint",
                                                    "obj.pth", "--images", "imgs", "-o", "c.safetensors"],
         "never runs pickled code", ["c.safetensors"]),
    # eval and export
    Case("eval onnx missing", ["eval", "--onnx", "nope.onnx"], "does not exist"),
    Case("eval onnx garbage", ["eval", "--onnx", "garbage.onnx"], "not a readable ONNX model"),
    Case("eval images with the built-in model", ["eval", "--images", "imgs"], "built-in digits model evaluates"),
    Case("eval csv empty label", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_empty.csv"],
         "labels_empty.csv:1: the label must be a class index"),
    Case("eval csv word label", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_word.csv"],
         "labels_word.csv:2: the label must be a class index (an integer >= 0), got 'cat'"),
    Case("eval csv all files missing", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_missing.csv"],
         "none of the 2 files"),
    Case("eval csv superscript label", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_superscript.csv"],
         "must be a class index"),
    Case("eval csv NUL in a label", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_nul.csv"],
         "must be a class index"),
    Case("eval csv 200,000-character label", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_huge.csv"],
         "field larger than field limit"),
    Case("eval csv short row", ["eval", "--model", "vit_tiny_patch16_224", "--csv", "labels_short.csv"],
         "expected 'file,label'"),
    Case("export opset 99", ["export", "--opset", "99", "-o", "e.onnx"], "--opset 99 is not supported", ["e.onnx"]),
    Case("export opset 9", ["export", "--opset", "9", "-o", "e.onnx"], "--opset 9 is not supported", ["e.onnx"]),
    Case("export onto a fifo", ["export", "-o", "fifo"], "not a regular file"),
    # Hugging Face folders and texts (a small random BERT in folder bert/)
    Case("run texts empty file", ["run", "--model", "bert", "--texts", "empty.txt", "--out", "r"],
         "holds no usable text", ["r"]),
    Case("run texts blank lines", ["run", "--model", "bert", "--texts", "blank.txt", "--out", "r"],
         "holds no usable text (3 line(s) read, 3 skipped; first: line 1: empty)", ["r"]),
    Case("run texts binary", ["run", "--model", "bert", "--texts", "binary.bin", "--out", "r"],
         "is not a text file", ["r"]),
    Case("run texts one 1 MB line", ["run", "--model", "bert", "--texts", "huge_line.txt", "--out", "r"],
         "longer than 100,000 bytes", ["r"]),
    Case("run texts jsonl without text", ["run", "--model", "bert", "--texts", "notext.jsonl", "--out", "r"],
         "no 'text' string", ["r"]),
    Case("run texts latin-1", ["run", "--model", "bert", "--texts", "latin1.txt", "--out", "r"], "not UTF-8", ["r"]),
    Case("run texts missing", ["run", "--model", "bert", "--texts", "nope.txt", "--out", "r"], "does not exist",
         ["r"]),
    Case("run eval texts binary", ["run", "--model", "bert", "--eval-texts", "binary.bin", "--out", "r"],
         "is not a text file", ["r"]),
    Case("compress texts binary", ["compress", "--model", "bert", "--texts", "binary.bin", "-o", "c.safetensors"],
         "is not a text file", ["c.safetensors"]),
    Case("export texts jsonl without text", ["export", "--model", "bert", "--texts", "notext.jsonl", "-o", "e.onnx"],
         "no 'text' string", ["e.onnx"]),
    Case("run images for a text model", ["run", "--model", "bert", "--images", "imgs", "--out", "r"],
         "is a text model", ["r"]),
    Case("run texts for an image model", ["run", "--texts", "ok_texts.txt", "--out", "r"], "is for a text model",
         ["r"]),
    Case("run max length 1", ["run", "--model", "bert", "--max-length", "1", "--out", "r"], "at least 2 tokens",
         ["r"]),
    Case("run max length beyond positions", ["run", "--model", "bert", "--max-length", "100000", "--out", "r"],
         "beyond the model's 256 positions", ["r"]),
    Case("run seq len 0", ["run", "--model", "bert", "--seq-len", "0", "--out", "r"], "--seq-len must be", ["r"]),
    Case("run folder without config", ["run", "--model", "noconfig", "--out", "r"], "config.json is missing", ["r"]),
    Case("run folder without weights", ["run", "--model", "noweights", "--out", "r"], "no safetensors weights",
         ["r"]),
    Case("run hf path missing", ["run", "--model", "hf:nowhere", "--out", "r"], "is not a folder", ["r"]),
    Case("compress like a larger sibling", ["compress", "--model", "bert", "--like", "bert_big", "-o",
                                            "c.safetensors"], "not fewer than the model's", ["c.safetensors"]),
    Case("compress like an unknown model", ["compress", "--model", "bert_big", "--like", "vit_tiny_patch16_22",
                                            "-o", "c.safetensors"], "unknown timm model", ["c.safetensors"]),
    Case("compress like with keep", ["compress", "--model", "bert_big", "--like", "bert", "--keep", "0.5", "-o",
                                     "c.safetensors"], "--like sets the budget", ["c.safetensors"]),
    Case("compress bytes without a value", ["compress", "--bytes", "-o", "c.safetensors"],
         "--bytes needs a value", ["c.safetensors"]),
    Case("bench eval texts without a model", ["bench", "m.onnx", "m.onnx", "--eval-texts", "empty.txt", "--out",
                                              "b"], "needs --model", ["b"]),
    Case("eval a text model", ["eval", "--model", "bert"], "scores top-1 on labelled images"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):  # digits: the built-in model is trained and cached before the CLI runs
    d = tmp_path_factory.mktemp("bad")
    _fixtures(d)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "opt": object.__new__(_Unsafe)}, d / "obj.pth")
    return d


class _Unsafe:  # a Python object in a checkpoint: what weights_only=True refuses
    pass


def run_case(case: Case, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    def limit():
        if case.fsize_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize_limit, case.fsize_limit))

    env = {**os.environ, "MIXRANK_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *case.args], capture_output=True, text=True, cwd=cwd, env=env,
                          preexec_fn=limit, timeout=timeout)


def test_the_table_is_large_enough():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, files):
    out = run_case(case, files)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == case.code, (out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith("mixrank: error: "), lines[0]
    assert case.message in lines[0], lines[0]
    for p in case.absent:
        assert not (files / p).exists(), f"{p} was left behind"
    left = [p.name for p in files.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


SUBCOMMANDS = ["run", "compress", "export", "rewrite", "build", "bench", "eval", "check", "inspect"]
GARBAGE = st.sampled_from(["", "-", "--", "x", "0", "-1", "nan", "1e999", "a,b", "fifo", "adir", "afile",
                           "garbage.onnx", "latin1.json", "list.json", "/dev/null", "imgs", "bomb", "m.onnx",
                           "f.safetensors", "--keep", "--bytes", "--batches", "--opset", "--out", "-o",
                           "--junit", "--inputs", "--precision", "\u00e9\u00e9", "../../etc/passwd"])


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(SUBCOMMANDS), words=st.lists(GARBAGE, min_size=1, max_size=4))
def test_garbage_never_exits_70(files, cmd, words):
    """Every subcommand, fed garbage arguments and files: an answer, never a crash (70).
    A combination that happens to be valid starts real work; after 30 s it is stopped and
    counts as no crash."""
    try:
        out = run_case(Case("garbage", [cmd, *words], ""), files, timeout=30)
    except subprocess.TimeoutExpired:
        return
    assert out.returncode != 70, out.stderr[-3000:]
