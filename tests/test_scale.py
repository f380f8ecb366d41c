"""Scaling: Grams spilled to memory-mapped files, and data parallelism over torch.distributed
(gloo on localhost; two processes on one machine)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixrank.compress import CompressConfig, MixrankError, compress_model, load_factors

HERE = Path(__file__).parent
WORKER = HERE / "helpers" / "dist_worker.py"
DIST_TIMEOUT = 300  # a hang shows as a timeout, far above the seconds these runs take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _ranks(args: list[str], world: int = 2) -> list[subprocess.CompletedProcess]:
    """``world`` processes joined as torchrun would join them, without its agent (so a
    rank that fails is not killed for the others: each must stop on its own)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(world)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=DIST_TIMEOUT)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _ranks_of(f) -> dict:
    return {n: r.rank for n, r in f.plan.layers.items()}


# ---------------------------------------------------------------------------- spill


def test_spilled_grams_give_identical_factors(digits, tmp_path, monkeypatch):
    from mixrank._demo import digits_calibration

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("MIXRANK_SPILL_DIR", str(spill))
    calib = digits_calibration(256)
    cfg = dict(keep=0.4, effort="fast")
    a = compress_model(digits["model"], calib, CompressConfig(**cfg), progress=False)
    b = compress_model(digits["model"], calib, CompressConfig(**cfg, max_memory=0), progress=False)
    assert b.plan.config["max_memory"] == 0
    assert _ranks_of(a) == _ranks_of(b)
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    del b
    import gc

    gc.collect()
    assert list(spill.iterdir()) == [], "the spilled Grams must be removed with the statistics"


def test_spill_keeps_only_the_budget_in_memory(digits):
    from mixrank._demo import digits_calibration
    from mixrank.compress.calibrate import collect_stats, gram_bytes, select_layers

    model = digits["model"]
    layers = select_layers(model, None, None)
    sizes = {n: model.get_submodule(n).in_features for n in layers}
    budget = sum(gram_bytes(n) for n in sizes.values()) // 2
    calib = collect_stats(model, layers, digits_calibration(128), progress=False, max_memory=budget)
    kept = sum(gram_bytes(sizes[n]) for n, st in calib.layers.items() if not st.spilled)
    assert 0 < calib.spilled_bytes and kept <= budget
    full = collect_stats(model, layers, digits_calibration(128), progress=False)
    for n in layers:
        assert torch.equal(calib.layers[n].gram, full.layers[n].gram), n


@pytest.mark.parametrize("bad", ["-1", "lots", "4 parsecs", 1.5, True])
def test_max_memory_refuses_nonsense(bad):
    with pytest.raises(MixrankError, match="max_memory"):
        CompressConfig(max_memory=bad)


def test_max_memory_sizes():
    assert CompressConfig(max_memory="4GB").max_memory == 4 * 10**9
    assert CompressConfig(max_memory="512MiB").max_memory == 512 * 2**20
    assert CompressConfig(max_memory=1000).max_memory == 1000


# ---------------------------------------------------------------------------- torch.distributed


@pytest.mark.slow
def test_two_gloo_ranks_sum_the_same_grams(digits, tmp_path):
    out = tmp_path / "grams.pt"
    runs = _ranks([str(WORKER), "grams", str(out)])
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    two = torch.load(out)
    one_path = tmp_path / "one.pt"
    one = subprocess.run([sys.executable, str(WORKER), "grams", str(one_path)], capture_output=True, text=True,
                         env=_env(), timeout=DIST_TIMEOUT)
    assert one.returncode == 0, one.stderr[-2000:]
    one = torch.load(one_path)
    assert two.pop("_batches") == one.pop("_batches") == 8
    for name, g in one.items():
        rel = float((two[name] - g).norm() / g.norm())
        assert rel <= 1e-12, (name, rel)


@pytest.mark.slow
def test_a_rank_that_dies_stops_every_rank(digits):
    t0 = time.monotonic()
    runs = _ranks([str(WORKER), "nan"])
    assert time.monotonic() - t0 < DIST_TIMEOUT
    assert all(r.returncode != 0 for r in runs), [(r.returncode, r.stderr[-500:]) for r in runs]
    assert runs[1].returncode == 2 and "NaN or Inf inputs in calibration batch 3" in runs[1].stderr
    assert runs[0].returncode == 2 and "another rank stopped" in runs[0].stderr, runs[0].stderr[-1000:]
    for r in runs:
        assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_compress_equals_one_process(digits, tmp_path):
    """``torchrun --nproc-per-node 2 -m mixrank compress`` on gloo: the same ranks,
    precisions and plan as one process, tensors equal up to the order of summation,
    and rank 0 alone writes."""
    args = ["-m", "mixrank", "compress", "--keep", "0.4", "--json", "-q"]
    one = subprocess.run([sys.executable, *args, "-o", str(tmp_path / "one.safetensors")], capture_output=True,
                         text=True, env=_env(), timeout=DIST_TIMEOUT, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), *args, "-o", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=_env(), timeout=DIST_TIMEOUT, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout[two.stdout.index("{"):])
    assert summary["ranks"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]
    a, b = load_factors(tmp_path / "one.safetensors"), load_factors(tmp_path / "two.safetensors")
    assert _ranks_of(a) == _ranks_of(b)
    assert {n: r.precision for n, r in a.plan.layers.items()} == {n: r.precision for n, r in b.plan.layers.items()}
    assert a.plan.allocation.refinement.chosen == b.plan.allocation.refinement.chosen
    assert [c["name"] for c in a.plan.allocation.candidates] == [c["name"] for c in b.plan.allocation.candidates]
    for ca, cb in zip(a.plan.allocation.candidates, b.plan.allocation.candidates, strict=True):
        assert cb["score"] == pytest.approx(ca["score"], rel=1e-4), ca["name"]
    assert a.plan.totals == b.plan.totals
    for k, t in a.tensors.items():
        diff = float((b.tensors[k].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30))
        assert diff < 1e-3, (k, diff)


# ---------------------------------------------------------------------------- reproducibility


def _busy(stop_after: float) -> subprocess.Popen:
    loop = f"import time\nt = time.time()\nwhile time.time() - t < {stop_after}: pass"
    return subprocess.Popen([sys.executable, "-c", loop])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_factors_files_are_byte_identical_across_processes(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes per process; the
    factors file must not inherit that (found by the test below on the first try)."""
    code = ("import sys, torch\n"
            "from mixrank.compress import Factors, save_factors\n"
            "t = {f'l{i}.A': torch.arange(6.0).reshape(2, 3) * i for i in range(4)}\n"
            "save_factors(Factors(t), sys.argv[1])\n")
    digest = []
    for i in range(3):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.st")],
                           capture_output=True, text=True, env=_env())
        assert r.returncode == 0, r.stderr[-2000:]
        digest.append(_sha(tmp_path / f"{i}.st"))
    assert len(set(digest)) == 1


@pytest.mark.slow
def test_mixrank_run_writes_the_same_bytes_under_load(digits, tmp_path):
    """The default compression has no wall-clock bound: a second `mixrank run` on a CPU
    loaded by two busy loops writes the same factors file, byte for byte, and the same
    ONNX files. The integer weights' form is fixed (``--int-weights auto`` chooses it by
    timing, which a loaded CPU may change), and the timing is short: it is not compared."""
    outs = []
    for load in (False, True):
        out = tmp_path / f"run{int(load)}"
        busy = [_busy(900) for _ in range(2)] if load else []
        try:
            r = subprocess.run([sys.executable, "-m", "mixrank", "run", "--out", str(out), "--quiet",
                                "--int-weights", "expanded", "--seconds", "1"],
                               capture_output=True, text=True, env=_env(), timeout=900)
        finally:
            for p in busy:
                p.kill()
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    onnx = sorted(p.name for p in outs[0].glob("*.onnx"))
    assert onnx and onnx == sorted(p.name for p in outs[1].glob("*.onnx"))
    assert _sha(outs[0] / "model.mixrank.safetensors") == _sha(outs[1] / "model.mixrank.safetensors")
    for name in onnx:
        assert _sha(outs[0] / name) == _sha(outs[1] / name), name


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--method", "svd", "--keep", "0.4"], ["--effort", "fast"]],
                         ids=["svd", "fast"])
def test_factors_files_are_byte_identical_across_thread_counts(digits, tmp_path, flags):
    """issue 27: MKL's eigh and SVD round differently on 1 and 2 threads, and the plan's
    figures differed in their last digits; the decompositions now run on one thread and the
    plan records its figures rounded, so the file is the same bytes."""
    digests = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.safetensors"
        r = subprocess.run([sys.executable, "-m", "mixrank", "compress", *flags, "-q", "-o", str(out)],
                           capture_output=True, text=True, timeout=600,
                           env=_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads))
        assert r.returncode == 0, r.stderr[-2000:]
        digests.append(_sha(out))
    assert digests[0] == digests[1]


def test_decompositions_give_the_same_bits_on_any_thread_count():
    from mixrank.compress import _linalg as linalg

    torch.manual_seed(0)
    x = torch.randn(900, 160, dtype=torch.float64)
    g, w = x.T @ x, torch.randn(300, 160, dtype=torch.float64)
    saved = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            e, q = linalg.eigh(g)
            got.append((e, q, *linalg.svd(w @ q, full_matrices=False), linalg.cholesky(g)))
            assert torch.get_num_threads() == threads  # restored after each call
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))
