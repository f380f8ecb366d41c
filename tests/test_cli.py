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
