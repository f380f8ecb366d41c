"""Reliability below the command line: file modes, refusing to write over what is not a
regular file, one writer per output folder, data problems named instead of swallowed."""

import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from mixrank.compress import (
    CompressConfig,
    FolderLock,
    MixrankError,
    atomic_write_text,
    check_writable_path,
    compress_model,
    image_csv,
    image_folder,
    save_factors,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_artifacts_are_normal_files(tmp_path, tiny_vit, umask_022):
    """mkstemp's 0600 must not leak: an inference server running as another user reads them."""
    from mixrank.engines import build_report, write_report
    from mixrank.exporter import export_onnx

    f = compress_model(tiny_vit, [torch.randn(4, 3, 32, 32) for _ in range(2)], CompressConfig(method="whiten"),
                       progress=False)
    paths = [save_factors(f, tmp_path / "f.safetensors"), atomic_write_text(tmp_path / "t.txt", "x")]
    export_onnx(tiny_vit, torch.randn(1, 3, 32, 32), tmp_path / "o.onnx")
    paths.append(tmp_path / "o.onnx")
    fp = {"params": 1, "initializer_bytes": 1, "file_bytes": 1, "peak_rss_bytes": 1}
    rep = build_report({"engine": "onnxruntime", "settings": {"provider": "cpu", "threads": 0,
                                                               "optimization": "all"},
                        "footprint": {"original": fp, "compressed": fp}, "throughput": []})
    paths += list(write_report(rep, tmp_path / "r").values())
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    os.umask(0o002)
    atomic_write_text(tmp_path / "g.txt", "x")
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o664


def test_only_regular_files_are_replaced(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for target, match in ((tmp_path / "fifo", "not a regular file"), ("/dev/null", "not a regular file"),
                          (tmp_path, "is a directory")):
        with pytest.raises(MixrankError, match=match):
            atomic_write_text(target, "x")
    (tmp_path / "in.onnx").write_text("model")
    with pytest.raises(MixrankError, match="is the input"):
        check_writable_path(tmp_path / "in.onnx", inputs=(tmp_path / "in.onnx",))
    check_writable_path(tmp_path / "in.onnx", inputs=(tmp_path / "in.onnx",), overwrite_input=True)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "a.txt", "old")

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", boom)
    with pytest.raises(MixrankError, match="No space left on device"):
        atomic_write_text(tmp_path / "a.txt", "new")
    monkeypatch.undo()
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_one_writer_per_output_folder(tmp_path, digits):
    """A second `mixrank run` on a folder another process holds exits 2 and names it."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom mixrank.compress import FolderLock\n"
        f"with FolderLock({str(tmp_path)!r}, 'mixrank run --keep 0.4'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "mixrank", "run", "--out", str(tmp_path), "-q"],
                             capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert f"in use by process {holder.pid} (mixrank run --keep 0.4)" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and time.time() - t0 < 60
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path, "now free"):  # released by the holder's death
        pass


def test_nan_in_the_held_out_batches_names_the_batch(tiny_vit):
    batches = [torch.randn(4, 3, 32, 32) for _ in range(8)]
    batches[7][0, 0, 0, 0] = float("nan")  # a quarter is held out: batches 6 and 7
    with pytest.raises(MixrankError, match="held-out calibration batch 1 holds NaN or Inf"):
        compress_model(tiny_vit, batches, CompressConfig(method="whiten"), progress=False)


def test_all_zero_activations_are_named():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                [torch.nn.Sequential(torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(64, 16, bias=False))
                 for _ in range(2)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with pytest.raises(MixrankError, match="received only zero inputs"):
        compress_model(Model(), [torch.zeros(4, 16) for _ in range(4)],
                       CompressConfig(keep=0.5, rank_step=4, min_rank=4), progress=False)


def test_skipped_and_missing_images_are_counted(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    data = image_folder(tmp_path, model, count=10)
    assert len(data.files) == 3 and len(data.skipped) == 1
    assert data.record() == {"used": 3, "requested": 10, "found": 4, "skipped": 1,
                             "skipped_files": [str(tmp_path / "bad.png")]}
    assert "1 unreadable file(s) skipped" in data.shortfall() and "3 images used of 10 requested" in data.shortfall()
    (tmp_path / "l.csv").write_text("0.png,1\nnowhere.png,2\n1.png,0\n")
    csv = image_csv(tmp_path / "l.csv", model)
    assert csv.labels == [1, 0] or csv.labels == [0, 1]
    assert [f for f, _ in csv.skipped] == [str(tmp_path / "nowhere.png")] and csv.found == 3


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    import timm

    Image.new("L", (7000, 7000)).save(tmp_path / "huge.png", optimize=True)
    assert (tmp_path / "huge.png").stat().st_size < 200_000
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    with pytest.raises(MixrankError, match="49 Mpixel, over the cap of 40 Mpixel"):
        image_folder(tmp_path, model)
    assert len(image_folder(tmp_path, model, max_pixels=50_000_000).files) == 1


def test_pretrained_without_network_fails_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "mixrank", "compress", "--model", "vit_tiny_patch16_224",
                          "--pretrained", "--images", str(tmp_path), "-o", str(tmp_path / "f.safetensors")],
                         capture_output=True, text=True, env=env)
    if "cannot reach the model hub" not in out.stderr:
        pytest.skip("the model hub is reachable from this machine")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 30


def test_rewrite_records_an_allowed_mismatch(tmp_path):
    import onnx
    from exporter_helpers import factors_from_weights, mlp

    from mixrank.exporter import rewrite_onnx

    a, b = mlp([8, 12, 4], 0), mlp([8, 12, 4], 1)
    torch.onnx.export(b, (torch.randn(2, 8),), str(tmp_path / "b.onnx"), dynamo=False, opset_version=17)
    f = factors_from_weights(a, ["0", "2"], rank=2)
    with pytest.raises(MixrankError, match=r"the weight of 0, 2 differs"):
        rewrite_onnx(tmp_path / "b.onnx", f, tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()
    rep = rewrite_onnx(tmp_path / "b.onnx", f, tmp_path / "c.onnx", allow_mismatch=True)
    assert rep.mismatched == ["0", "2"] and rep.to_dict()["allowed_mismatch"] is True
    assert onnx.load(str(tmp_path / "c.onnx")).graph.node


def test_rewrite_never_destroys_its_inputs_weights(tmp_path):
    """An output (or its weights file) at the input's external data is refused before any work,
    through the API as on the command line; the input still loads with its weights, and an
    in-place rewrite of the input itself still works."""
    import onnx
    from exporter_helpers import factors_from_weights
    from test_bad_inputs import external_data_fixtures

    from mixrank.compress import MixrankError, save_factors
    from mixrank.exporter import load_onnx, rewrite_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    torch.onnx.export(model, (torch.randn(2, 16),), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17)
    save_factors(factors_from_weights(model, ["0", "2"], rank=4), tmp_path / "f.safetensors")
    external_data_fixtures(tmp_path / "m.onnx", tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in ("w.bin", "out2.onnx.data")}
    for src, out in (("ext.onnx", "w.bin"), ("ext2.onnx", "out2.onnx"), ("m.onnx", "dirout.onnx")):
        with pytest.raises(MixrankError, match="external data|not a regular file"):
            rewrite_onnx(tmp_path / src, tmp_path / "f.safetensors", tmp_path / out)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not (tmp_path / "out2.onnx").exists() and not (tmp_path / "dirout.onnx").exists()
    for src in ("ext.onnx", "ext2.onnx"):
        assert len(load_onnx(tmp_path / src).graph.initializer) == 4
    rewrite_onnx(tmp_path / "ext2.onnx", tmp_path / "f.safetensors", tmp_path / "ext2.onnx")  # in place
    onnx.checker.check_model(str(tmp_path / "ext2.onnx"), full_check=True)


def test_sigterm_during_run_leaves_nothing(tmp_path, digits):
    """SIGTERM while `mixrank run` compresses: one line, exit 143, and the folder it created
    (holding only its lock) is gone, as after Ctrl-C."""
    import signal

    env = {**os.environ, "MIXRANK_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixrank", "run", "--out", "r", "--seconds", "1"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r" / ".mixrank.lock").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "mixrank: terminated (SIGTERM)", err[-2000:]
    assert not (tmp_path / "r").exists(), list((tmp_path / "r").iterdir())


def test_a_damaged_model_cache_is_retrained_and_a_bad_cache_path_fails_first(tmp_path, capsys, monkeypatch):
    """A cached model whose bytes were changed but which still loads is not used (its digest
    does not match): one warning, and it is trained again. A cache path that is a file fails
    before any training."""
    from mixrank import _demo
    from mixrank._demo import DigitsRecipe, digits_vit

    recipe = DigitsRecipe(embed_dim=16, depth=1, num_heads=2, epochs=1)
    first = digits_vit(recipe, progress=False, cache=tmp_path)
    path = next(tmp_path.glob("digits_vit_*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a bit of the last weight: still a valid file
    path.write_bytes(bytes(data))
    trained = []
    real = _demo.train_digits_vit
    monkeypatch.setattr(_demo, "train_digits_vit", lambda *a, **k: trained.append(1) or real(*a, **k))
    again = digits_vit(recipe, progress=False, cache=tmp_path)
    assert trained == [1] and "is damaged" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    assert digits_vit(recipe, progress=False, cache=tmp_path) is not None and trained == [1]  # now it loads
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MixrankError, match="MIXRANK_CACHE"):
        digits_vit(recipe, progress=False, cache=tmp_path / "afile")
    assert trained == [1]
