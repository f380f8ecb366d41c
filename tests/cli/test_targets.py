"""GPU targets of the main job (`mixrank run --engine/--provider/--engine-precision`), the
TensorRT runner (``tensorrt`` marker: skipped where TensorRT is missing) and installs in which
the two onnxruntime builds never meet."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixrank._target import Target
from mixrank.compress import MixrankError

ROOT = Path(__file__).resolve().parents[2]


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _mixrank(*args, cwd, pre: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{pre}\nfrom mixrank.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


# ------------------------------------------------------------------ targets


@pytest.mark.parametrize("args, expect", [
    ((None, None, None), {"engine": "onnxruntime", "provider": "cpu"}),
    (("onnxruntime", "cuda", None), {"engine": "onnxruntime", "provider": "cuda"}),
    (("onnxruntime", "tensorrt", "fp32"), {"engine": "onnxruntime", "provider": "tensorrt", "precision": "fp32"}),
    (("tensorrt", None, None), {"engine": "tensorrt", "precision": "fp16"}),
    (("tensorrt", None, "int8"), {"engine": "tensorrt", "precision": "int8"}),
])
def test_targets(args, expect):
    t = Target.from_args(*args)
    d = t.describe()
    assert {k: d[k] for k in expect} == expect
    assert t.rewrite_target == ("tensorrt" if "tensorrt" in (t.engine, t.provider) else "onnxruntime")
    want = {"cpu": ("int8_dynamic", "int8", "int4"), "cuda": ("int8", "int4")}
    assert t.references == (want[t.provider] if t.rewrite_target == "onnxruntime" else ())


@pytest.mark.parametrize("args, match", [
    (("tensorrt", "cuda", None), "leave it out"),
    (("onnxruntime", "cpu", "fp16"), "--engine-precision sets TensorRT"),
    (("onnxruntime", "tensorrt", "int8"), "int8 engines"),
    (("tvm", None, None), "unknown engine"),
])
def test_meaningless_targets_are_refused(args, match):
    with pytest.raises(MixrankError, match=match):
        Target.from_args(*args)


def test_artifact_names_follow_the_target():
    assert Target.from_args(None, None, None).artifact("compressed") == "compressed.ort.onnx"
    assert Target.from_args(None, "cuda", None).artifact("compressed") == "compressed.ort-cuda.onnx"
    assert Target.from_args("tensorrt", None, "fp16").artifact("original") == "original.fp16.engine"


@pytest.mark.skipif(_has("tensorrt"), reason="TensorRT is installed here")
def test_run_engine_tensorrt_without_tensorrt_exits_2_in_one_line(tmp_path):
    r = _mixrank("run", "--engine", "tensorrt", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'tensorrt'" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before the check"


def test_run_provider_cuda_without_onnxruntime_gpu_exits_2(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    r = _mixrank("run", "--provider", "cuda", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixrank[gpu]" in lines[0] and "CUDAExecutionProvider" in lines[0]
    assert not (tmp_path / "out").exists()


def test_without_onnxruntime_one_line_names_both_extras(tmp_path):
    """Neither onnxruntime build installed (simulated: the import fails): the package still
    imports, and the first use of onnxruntime is one line naming [cpu] and [gpu]."""
    block = "sys.modules['onnxruntime'] = None  # as if neither build were installed"
    r = subprocess.run([sys.executable, "-c", f"import sys\n{block}\nimport mixrank, mixrank.engines, "
                        "mixrank.exporter, mixrank.compress\nprint('ok')"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = _mixrank("run", "--out", "out", cwd=tmp_path, pre=block)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixrank[cpu]" in lines[0] and "mixrank[gpu]" in lines[0]


# ------------------------------------------------------------------ installs


def _resolve(extra: str, tmp_path: Path) -> set[str]:
    """What pip would install for ``.[extra]`` into an empty environment (resolved, not
    installed: ``pip install --dry-run --report``)."""
    report = tmp_path / f"{extra}.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f"{ROOT}[{extra}]"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and ("No matching distribution" in r.stderr or "Could not find a version" in r.stderr):
        pytest.skip(f"the package index cannot resolve .[{extra}] here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return {i["metadata"]["name"].lower().replace("_", "-") for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_gpu_extra_does_not_pull_the_cpu_onnxruntime(tmp_path):
    names = _resolve("gpu", tmp_path)
    assert "onnxruntime-gpu" in names
    assert "onnxruntime" not in names, "mixrank[gpu] must not bring the CPU onnxruntime build"


@pytest.mark.slow
def test_cpu_extra_pulls_only_the_cpu_onnxruntime(tmp_path):
    names = _resolve("cpu", tmp_path)
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names


def test_base_package_depends_on_no_onnxruntime_build():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.lower().startswith("onnxruntime")]
    assert meta["optional-dependencies"]["cpu"][0].startswith("onnxruntime>=")
    assert meta["optional-dependencies"]["gpu"][0].startswith("onnxruntime-gpu")
    assert "'.[cpu,dev]'" in (ROOT / "Makefile").read_text()


# ------------------------------------------------------------------ TensorRT (skipped without it)


@pytest.mark.tensorrt
def test_tensorrt_runner_matches_onnxruntime(tmp_path):
    pytest.importorskip("tensorrt")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from mixrank.engines import OrtSettings, TrtSettings, build_engine, make_runner, random_feeds
    from mixrank.exporter import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)).eval()
    export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx")
    build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", TrtSettings(precision="fp32", max_batch=8, opt_batch=8))
    trt, ort = make_runner("tensorrt", tmp_path / "m.engine"), make_runner("onnxruntime", tmp_path / "m.onnx",
                                                                           OrtSettings())
    try:
        feeds = random_feeds(ort, 8)
        np.testing.assert_allclose(trt.infer(feeds)[0], ort.infer(feeds)[0], rtol=1e-3, atol=1e-4)
        times = trt.time(feeds, 5)
        assert len(times) == 5 and all(t > 0 for t in times)
        mem = trt.memory()
        assert mem["engine_bytes"] == (tmp_path / "m.engine").stat().st_size and mem["device_memory_bytes"] >= 0
        assert trt.describe()["device"]
    finally:
        trt.close()
        ort.close()


@pytest.mark.tensorrt
@pytest.mark.slow
def test_run_on_tensorrt_measures_and_gates(digits, tmp_path):
    pytest.importorskip("tensorrt")
    budget = tmp_path / "b.toml"
    budget.write_text("max_param_ratio = 0.5\nmin_top1_agreement = 0.9\n")
    r = subprocess.run([sys.executable, "-m", "mixrank", "run", "--engine", "tensorrt", "--out", str(tmp_path / "o"),
                        "--limits", str(budget), "--json", "-q"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    m = rep["measurement"]
    assert m["engine"] == "tensorrt" and m["target"]["engine"] == "tensorrt"
    assert m["footprint"]["compressed"]["device_memory_bytes"] > 0
    assert (tmp_path / "o" / "compressed.fp16.engine").is_file()
    assert "TensorRT" in (tmp_path / "o" / "report.md").read_text()
