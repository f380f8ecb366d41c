import json
import subprocess
import sys

import pytest


def _mixrank(*args, cwd):
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.usefixtures("digits")  # the digits ViT is trained and cached first
def test_main_job_on_the_default(tmp_path):
    out = _mixrank("run", "-q", "--json", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["params_after"] < 0.5 * s["params_before"]
    assert s["accuracy_after"] >= s["accuracy_before"] - 0.01
    assert (tmp_path / "o" / "model.mixrank.safetensors").is_file()


def test_user_error_is_one_line_without_traceback(tmp_path):
    out = _mixrank("run", "-q", "--keep", "1.5", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["mixrank: error: keep must be a fraction in (0, 1), got 1.5"]


def test_help(tmp_path):
    for args in (["--help"], ["run", "--help"]):
        out = _mixrank(*args, cwd=tmp_path)
        assert out.returncode == 0 and "usage: mixrank" in out.stdout


def test_rewrite_command_and_its_errors(tmp_path):
    import re

    import onnx
    from exporter_helpers import factors_from_weights
    from test_rewrite import build_graph, mlp

    from compress import save_factors

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
