"""Data parallelism over ``torch.distributed`` (docs/design.md, "Scaling out").

Launched by ``torchrun``, every rank loads the same model and calibration data; the data
passes are split between the ranks and their results combined so that every rank ends
with what one process would have computed:

- statistics: each rank sums the Gram matrices of its share of the batches, and the sums
  are all-reduced in float64 (equal to one process up to the order of summation);
- scoring: each rank scores its share of the held-out batches and the per-batch errors
  are gathered and combined in batch order (bit-identical to one process);
- gradient refinements: each step's batch is split by rows, every rank's loss is
  normalised by the whole batch, and the gradients are all-reduced (the one-process
  gradient up to the order of summation).

Rank 0 alone writes files. Without an initialised process group every helper is the
one-process identity, so the same code runs everywhere. A rank that fails makes the
others fail too: collectives on a dead peer raise instead of waiting (and the process
group has a timeout).
"""

from __future__ import annotations

import datetime
import os

import torch

from mixrank.core import MixrankError

from ._batches import slice_batch

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_writer() -> bool:
    """Only rank 0 writes files."""
    return rank() == 0


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset or empty).

    Raises:
        MixrankError: it is not a positive whole number.
    """
    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise MixrankError(f"WORLD_SIZE={text!r} is not a positive number of processes; unset it, or launch with "
                           "torchrun")
    return int(text)


def init_from_env(device: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): gloo on the CPU,
    nccl on CUDA. Returns whether this process is one of several.

    Raises:
        MixrankError: the environment is half set or the rendezvous fails.
    """
    size = world_size_from_env()
    if size <= 1 or active():
        return active()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MixrankError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set; launch with torchrun")
    cuda = (device or "").startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        torch.distributed.init_process_group(backend, timeout=timeout)
    except Exception as e:
        raise MixrankError(f"cannot join the {backend} process group of {size} ranks: {str(e)[:200]}") from None
    return True


def shard(items: list) -> list[int]:
    """The indices of ``items`` this rank processes (round robin)."""
    return list(range(rank(), len(items), world()))


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (the same tensor on one process)."""
    if active():
        _collective(torch.distributed.all_reduce, t)
    return t


def all_reduce_sum_int(x: int) -> int:
    if not active():
        return x
    t = torch.tensor([x], dtype=torch.int64)
    _collective(torch.distributed.all_reduce, t)
    return int(t.item())


def gather_by_index(values: dict[int, float], n: int) -> list[float]:
    """Every rank's ``{index: value}`` combined into the list of ``n`` values in index
    order, on every rank."""
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    for i, v in values.items():
        out[i] = v
    if active():
        mask = torch.zeros(n, dtype=torch.float64)
        mask[list(values)] = 1.0
        vals = torch.where(mask > 0, out, torch.zeros_like(out))
        _collective(torch.distributed.all_reduce, vals)
        _collective(torch.distributed.all_reduce, mask)
        if not bool((mask == 1).all()):
            raise RuntimeError("a scored batch was computed by no rank or by two")
        out = vals
    return out.tolist()


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank."""
    if not active():
        return obj
    box = [obj]
    _collective(torch.distributed.broadcast_object_list, box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        _collective(torch.distributed.barrier)


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo: "Connection closed by peer", a timeout, ...
        raise MixrankError(f"rank {rank()} of {world()}: another rank stopped during {fn.__name__} "
                           f"({str(e).splitlines()[0][:160]}); see that rank's error") from None


def row_split(batch, size: int):
    """(this rank's rows of ``batch``, the number of its rows): rows split as evenly as
    possible, rank r taking the r-th part (everything on one process)."""
    if not active():
        return batch, size
    w, r = world(), rank()
    lo, hi = r * size // w, (r + 1) * size // w
    return slice_batch(batch, lo, hi, size), hi - lo
