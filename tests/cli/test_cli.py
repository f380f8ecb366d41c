import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the real CLI in subprocesses, on the trained digits model


def _mixrank(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mixrank", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory, digits):
    """``mixrank run`` with no model argument (the README's main job), fast timing."""
    d = tmp_path_factory.mktemp("run")
    out = _mixrank("run", "-q", "--json", "--out", "o", "--seconds", "3", "--batches", "1,8", cwd=d)
    assert out.returncode == 0, out.stderr
    return d, json.loads(out.stdout)


def test_main_job_on_the_default(main_job):
    d, s = main_job
    assert s["param_ratio"] < 0.5 and s["initializer_bytes_ratio"] < 0.5
    assert s["top1_drop"] <= 0.01  # keep=0.4 default: within a point of the original
    for f in ("model.mixrank.safetensors", "original.onnx", "compressed.onnx", "report.json",
              "report.md", "layers.png", "latency.png", "manifest.json", "compressed.ort.onnx"):
        assert (d / "o" / f).is_file(), f
    man = json.loads((d / "o" / "manifest.json").read_text())
    assert set(man["stages"]) == {"compress", "export", "reference", "rewrite", "build", "bench"}
    assert all(len(a["sha256"]) == 64 and a["command"].startswith("mixrank")
               for a in man["artifacts"].values())


def test_rerun_reuses_stages_and_budget_gate(main_job):
    d, _ = main_job
    (d / "tight.toml").write_text("max_param_ratio = 0.1\nmin_top1_agreement = 0.9\n")
    out = _mixrank("run", "--out", "o", "--seconds", "3", "--batches", "1,8", "--budget", "tight.toml",
                   "--junit", "j.xml", cwd=d)
    assert out.returncode == 1, out.stderr  # a limit failed
    assert out.stderr.count("up to date, reused") == 6
    assert "FAIL  max_param_ratio" in out.stdout
    assert (d / "j.xml").read_text().count("<failure") == 1
    (d / "ok.toml").write_text("max_param_ratio = 0.5\n")
    chk = _mixrank("check", "o/report.json", "ok.toml", cwd=d)
    assert chk.returncode == 0 and "all limits pass" in chk.stdout
    (d / "nm.toml").write_text("max_engine_bytes = 1\nmax_top1_drop = 0.5\nmin_speedup = { 64 = 1.0 }\n")
    chk = _mixrank("check", "o/report.json", "nm.toml", cwd=d)
    assert chk.returncode in (1, 3)
    (d / "nm2.toml").write_text("min_speedup = { 64 = 1.0 }\n")
    assert _mixrank("check", "o/report.json", "nm2.toml", cwd=d).returncode == 3  # not measured
    ins = _mixrank("inspect", "o/model.mixrank.safetensors", cwd=d)
    assert ins.returncode == 0 and "layers factored" in ins.stdout
    ev = _mixrank("eval", "--factors", "o/model.mixrank.safetensors", "--onnx", "o/compressed.onnx",
                  "--json", cwd=d)
    res = json.loads(ev.stdout)["results"]
    assert res["pytorch factored"]["top1"] == pytest.approx(res["onnx o/compressed.onnx"]["top1"], abs=0.003)
    # a pinned digest: the right one reads, sha256sum's file too; another refuses
    import hashlib

    digest = hashlib.sha256((d / "o" / "model.mixrank.safetensors").read_bytes()).hexdigest()
    (d / "f.sha256").write_text(f"{digest}  o/model.mixrank.safetensors\n")
    for pin in (digest.upper(), "f.sha256"):
        assert _mixrank("inspect", "o/model.mixrank.safetensors", "--require-digest", pin, cwd=d).returncode == 0
    bad = _mixrank("inspect", "o/model.mixrank.safetensors", "--require-digest", "0" * 64, cwd=d)
    assert bad.returncode == 2 and "is not the pinned file" in bad.stderr


def test_a_rerun_leaves_no_artifact_of_an_earlier_run(main_job):
    """issue 27: a run with --limits, then one without, must not leave the first check.json
    beside the second report; the manifest lists exactly the folder's artifacts."""
    d, _ = main_job
    (d / "loose.toml").write_text("max_param_ratio = 0.9\n")
    assert _mixrank("run", "-q", "--out", "o", "--seconds", "3", "--batches", "1,8", "--limits", "loose.toml",
                    cwd=d).returncode == 0
    assert (d / "o" / "check.json").is_file()
    assert "check" in json.loads((d / "o" / "manifest.json").read_text())["stages"]
    (d / "o" / "mine.txt").write_text("a file of the user's: never removed")
    out = _mixrank("run", "-q", "--out", "o", "--seconds", "3", "--batches", "1,8", cwd=d)
    assert out.returncode == 0, out.stderr
    assert not (d / "o" / "check.json").exists()
    man = json.loads((d / "o" / "manifest.json").read_text())
    on_disk = {p.name for p in (d / "o").iterdir() if not p.name.startswith(".")} - {"manifest.json", "mine.txt"}
    assert set(man["artifacts"]) == on_disk
    assert "check" not in man["stages"] and (d / "o" / "mine.txt").is_file()
    # a damaged manifest is ignored (every stage reruns), not a crash
    (d / "o" / "manifest.json").write_text('{"stages": [], "artifacts": null}')
    out = _mixrank("run", "-q", "--out", "o", "--seconds", "3", "--batches", "1,8", cwd=d)
    assert out.returncode == 0, out.stderr
    assert set(json.loads((d / "o" / "manifest.json").read_text())["artifacts"]) == on_disk


USER_ERRORS = [
    (["run", "--keep", "1.5"], "keep must be a fraction in (0, 1), got 1.5"),
    (["run", "--model", "vit_tiny_patch16_22"], "unknown timm model"),
    (["run", "--model", "vit_tiny_patch16_224"], "needs calibration images"),
    (["run", "--model", "vit_tiny_patch16_224", "--checkpoint", "nope.pth", "--images", "."],
     "checkpoint nope.pth does not exist"),
    (["run", "--limits", "bad.toml"], "unknown key 'max_parms'"),
    (["check", "missing.json", "bad.toml"], "does not exist"),
    (["compress", "--keep", "0.001"], "outside the feasible range"),
    (["inspect", "bad.toml"], "cannot inspect"),
    (["build", "missing.onnx", "-o", "x.onnx"], "cannot load"),
    (["build", "missing.onnx", "-o", "x.engine", "--engine", "tensorrt"], "tensorrt"),
    (["bench", "a.onnx", "b.onnx"], "does not exist"),
    (["eval", "--model", "vit_tiny_patch16_224", "--images", "flat"], "flat folder"),
]


@pytest.mark.parametrize("args, msg", USER_ERRORS, ids=[" ".join(a[:2]) for a, _ in USER_ERRORS])
def test_user_errors_are_one_line(tmp_path, args, msg, digits):
    (tmp_path / "bad.toml").write_text("max_parms = 1\n")
    (tmp_path / "flat").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "a.png")
    out = _mixrank(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith("mixrank: error: ") and msg in lines[0], lines[0]


SUBCOMMANDS = ["run", "compress", "export", "rewrite", "build", "bench", "eval", "check", "inspect"]


def test_help(tmp_path):
    for args in (["--help"], *[[c, "--help"] for c in SUBCOMMANDS]):
        out = _mixrank(*args, cwd=tmp_path)
        assert out.returncode == 0 and "usage: mixrank" in out.stdout, args
    text = " ".join(_mixrank("run", "--help", cwd=tmp_path).stdout.split())
    assert "whole model's float32 weight bytes such as 0.12x, lookup tables left out (default: 0.12x" in text


def test_rewrite_command_and_its_errors(tmp_path):
    import re

    import onnx
    from exporter_helpers import build_graph, factors_from_weights, mlp

    from mixrank.compress import save_factors

    model = mlp([8, 12, 4], 0)
    onnx.save(build_graph(model, ["matmul", "gemm"], [1.0, 1.0], 2), str(tmp_path / "m.onnx"))
    save_factors(factors_from_weights(model, ["0", "2"], rank=2), tmp_path / "f.safetensors")
    out = _mixrank("rewrite", "m.onnx", "f.safetensors", "-o", "c.onnx", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert len(rep["rewritten"]) == 2 and rep["tensorrt_check"]["ok"]
    other = mlp([8, 12, 4], 1)
    save_factors(factors_from_weights(other, ["0", "2"], rank=2), tmp_path / "g.safetensors")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    cases = [("bad.onnx", "f.safetensors", "not a readable ONNX model|not an ONNX model"),
             ("m.onnx", "g.safetensors", "match no MatMul"),
             ("m.onnx", "missing.safetensors", "does not exist"),
             ("nope.onnx", "f.safetensors", "does not exist")]
    for onnx_file, fac, msg in cases:
        r = _mixrank("rewrite", onnx_file, fac, "-o", "x.onnx", cwd=tmp_path)
        assert r.returncode == 2, (onnx_file, fac, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert re.search(msg, lines[0]), lines[0]
        assert not (tmp_path / "x.onnx").exists()
    r = _mixrank("rewrite", "m.onnx", "g.safetensors", "-o", "x.onnx", "--allow-partial",
                 cwd=tmp_path)
    assert r.returncode == 0 and "factors matching no node" in r.stdout


def test_the_old_option_names_still_work_with_a_one_line_warning(tmp_path):
    """``--budget`` is the deprecated name of ``--limits``, ``build --precision`` of
    ``--engine-precision``: each still works and says so on one line of stderr."""
    (tmp_path / "ok.toml").write_text("max_param_ratio = 0.5\n")
    (tmp_path / "r.json").write_text(json.dumps({"schema_version": 1, "summary": {"param_ratio": 0.4}}))
    old = _mixrank("bench", "a.onnx", "b.onnx", "--budget", "ok.toml", cwd=tmp_path)
    lines = old.stderr.strip().splitlines()
    assert old.returncode == 2 and len(lines) == 2, old.stderr
    assert lines[0] == ("mixrank: warning: --budget is deprecated: use --limits (the file of CI limits; the "
                        "budget is the compression's)") and "does not exist" in lines[1]
    both = _mixrank("bench", "a.onnx", "b.onnx", "--budget", "ok.toml", "--limits", "ok.toml", cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr
    trt = _mixrank("build", "missing.onnx", "-o", "x.engine", "--engine", "tensorrt", "--precision", "fp16",
                   cwd=tmp_path)
    assert trt.returncode == 2 and "--engine-precision" in trt.stderr.splitlines()[0], trt.stderr


def test_library_and_command_line_resolve_the_same_defaults():
    """The job's defaults live in the library (`job_config`): the command line's
    configuration is the library's for the same flags."""
    from mixrank.cli import build_parser
    from mixrank.cli._args import CompressArgs
    from mixrank.compress import JOB_BYTES, CompressConfig, job_config

    def cli(*argv, tensorrt=False):
        return CompressArgs.config(build_parser().parse_args(["compress", *argv]), tensorrt=tensorrt)

    assert cli() == job_config() == CompressConfig(bytes=JOB_BYTES, precision="auto")
    assert cli("--keep", "0.4") == job_config({"keep": 0.4}) == CompressConfig(keep=0.4)
    assert cli("--bytes", "50000").precision == "auto" and cli("--bytes", "50000", "--precision", "int8").precision \
        == "int8"
    assert cli(tensorrt=True).quantize.scheme == "symmetric" == job_config(tensorrt=True).quantize.scheme


def test_inspect_names_each_layers_form():
    """inspect shows a dense layer at its width and block, a residual layer with its Q, and a
    pair's layer with its pair; only factors carry an NMSE."""
    from mixrank.cli._file_tools import _layer_form

    base = {"sparse": "none", "k": 0, "nmse": 0.0325, "block": 128, "pair": None, "residual": None}
    assert _layer_form({**base, "dense": True, "precision": "int2", "rank": None}) == "dense int2 b128"
    res = _layer_form({**base, "dense": False, "form": "residual", "precision": "fp16", "block": None, "rank": 8,
                       "residual": "int2 b128"})
    assert res == "residual rank 8 fp16 + Q int2 b128  NMSE 3.25e-02"
    assert "(pair 3)" in _layer_form({**base, "dense": False, "form": "rows", "precision": "int8", "rank": 4,
                                      "pair": 3})


def test_version(tmp_path):
    import mixrank

    out = _mixrank("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"mixrank {mixrank.__version__}"


def test_the_torchrun_environment_is_checked(tmp_path):
    """A WORLD_SIZE that is not a number is one line and exit 2; a stray RANK without a job of
    several processes silences nothing; output into a closed pipe is no traceback."""
    import os

    env = {**os.environ, "WORLD_SIZE": "abc", "MIXRANK_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", "mixrank", "compress", "--method", "svd", "--keep", "0.4", "-o",
                          "f.safetensors"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stderr.strip() == ("mixrank: error: WORLD_SIZE='abc' is not a positive "
                                                          "number of processes; unset it, or launch with torchrun")
    assert not (tmp_path / "f.safetensors").exists()
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | {"RANK": "1"}
    out = subprocess.run([sys.executable, "-m", "mixrank", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "usage: mixrank" in out.stdout
    (tmp_path / "ok.toml").write_text("max_param_ratio = 0.5\n")
    from mixrank.engines import REPORT_SCHEMA

    rep = {"schema_version": REPORT_SCHEMA, "summary": {"param_ratio": 0.4}}
    (tmp_path / "r.json").write_text(json.dumps(rep))
    out = subprocess.run(f"{sys.executable} -m mixrank check r.json ok.toml | head -c 1", shell=True,
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "Traceback" not in out.stderr, out.stderr
