"""One process against ``torchrun --nproc-per-node N`` (gloo, this machine): wall time of
each and how far apart their factors are.

Runs ``mixrank compress`` (any of its arguments after ``--``) once alone and once under
torchrun, then prints both times, whether the ranks and precisions are the same, the
largest relative difference of a factor tensor and of an allocation score.

    python benchmarks/distributed.py [--nproc 2] [-- --keep 0.4 --effort balanced]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from mixrank.compress import load_factors

    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("rest", nargs="*", help="arguments of mixrank compress (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmds = {"1 process": [sys.executable, "-m", "mixrank", "compress", "-q", *args.rest,
                              "-o", str(tmp / "one.safetensors")],
                f"torchrun {args.nproc} gloo": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                str(args.nproc), "--master-port", str(_port()), "-m", "mixrank",
                                                "compress", "-q", *args.rest, "-o", str(tmp / "two.safetensors")]}
        secs = {}
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            secs[name] = time.perf_counter() - t0
            if r.returncode:
                sys.exit(f"{name} failed ({r.returncode}): {r.stderr[-2000:]}")
        a, b = load_factors(tmp / "one.safetensors"), load_factors(tmp / "two.safetensors")
    same_ranks = {n: (r.rank, r.precision) for n, r in a.plan.layers.items()} == \
                 {n: (r.rank, r.precision) for n, r in b.plan.layers.items()}
    worst = max(float((b.tensors[k].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30))
                for k, t in a.tensors.items())
    sa = [c["score"] for c in a.plan.allocation.candidates]
    sb = [c["score"] for c in b.plan.allocation.candidates]
    score = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(sa, sb, strict=False)) if sa else 0.0
    print(f"mixrank compress {' '.join(args.rest)}")
    for name, s in secs.items():
        print(f"  {name:<18} {s:7.1f} s (whole command: start-up, model load, compression, write)")
    print(f"  same ranks and precisions: {same_ranks}; same candidates: {len(sa) == len(sb)}; "
          f"variant {a.plan.allocation.refinement.chosen} / {b.plan.allocation.refinement.chosen}")
    print(f"  largest relative tensor difference {worst:.2e}; largest relative score difference {score:.2e}")


if __name__ == "__main__":
    main()
