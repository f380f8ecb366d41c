"""Decompositions that give the same bits on any thread count.

MKL's LAPACK (eigh, svd, Cholesky, solve) splits its work by the number of threads, and a
different split rounds differently: from 1 to 2 threads an eigenvector moves in its 13th
digit, and cast to float32, a few of a model's factor values then differ in their last bit.
The README promises the same factors file for the same inputs (docs/design.md,
"Determinism"), so every decomposition of the compression runs on one thread. Matrix
products keep every thread: their results do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def one_thread():
    """torch (and MKL) on one intra-op thread inside the block; the count is restored after."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _single(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)

    return wrapper


eigh = _single(torch.linalg.eigh)
svd = _single(torch.linalg.svd)
cholesky = _single(torch.linalg.cholesky)
cholesky_ex = _single(torch.linalg.cholesky_ex)
cholesky_inverse = _single(torch.cholesky_inverse)
solve = _single(torch.linalg.solve)
solve_triangular = _single(torch.linalg.solve_triangular)
