"""One rank of a hand-launched gloo group (tests/test_scale.py): RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT come from the environment, as torchrun sets them.

    dist_worker.py grams OUT.pt      collect the digits model's Grams, rank 0 saves them
    dist_worker.py nan               compress with a NaN batch in rank 1's share

Exits 2 with one line on a MixrankError, like the CLI.
"""

import os
import sys

import torch

from mixrank._demo import digits_calibration, digits_vit
from mixrank.compress import CompressConfig, MixrankError, compress_model
from mixrank.compress import distributed as _dist
from mixrank.compress.calibrate import collect_stats, select_layers


def main() -> None:
    what = sys.argv[1]
    model = digits_vit(progress=False)
    batches = digits_calibration(256, batch=32)
    _dist.init_from_env()
    if what == "grams":
        layers = select_layers(model, None, None)
        calib = collect_stats(model, layers, batches, progress=False)
        if _dist.is_writer():
            torch.save({n: calib.layers[n].gram for n in layers} | {"_batches": calib.batches}, sys.argv[2])
        _dist.barrier()
    elif what == "nan":
        batches[3] = torch.full_like(batches[3], float("nan"))  # batch 3: rank 1's share of 2
        compress_model(model, batches, CompressConfig(keep=0.4, effort="fast"), progress=False)
    else:
        raise SystemExit(f"unknown mode {what}")


if __name__ == "__main__":
    try:
        main()
    except MixrankError as e:
        print(f"mixrank: rank {os.environ.get('RANK')}: {e}", file=sys.stderr)
        sys.exit(2)
