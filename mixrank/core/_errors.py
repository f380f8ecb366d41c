"""One error type for user mistakes; anything else raised from mixrank is a bug."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


class MixrankError(Exception):
    """A user mistake (bad input, bad option, infeasible budget).

    The CLI prints its message on one line without a traceback and exits non-zero.
    The message says what is wrong and how to fix it.
    """


class WriteError(MixrankError, OSError):
    """The environment refused a write (full disk, permissions, read-only folder): a
    `MixrankError` (exit 2, one line) that is also an ``OSError``."""


def is_number(value) -> bool:
    """A finite real number given as a number (int or float; not a bool, not text): the one
    test of every numeric setting, whether it comes from the API, a TOML file or a flag."""
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def warn(msg: str) -> None:
    """A warning the user must see even with ``--quiet``: one line on stderr."""
    print(f"mixrank: warning: {msg}", file=sys.stderr)


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``" (did you mean: a, b?)"`` for the (at most ``n``) ``choices`` closest to
    ``name`` (by difflib, else by suffix or substring), or ``""``."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not hits:
        # Suffix matches help with qualified names ("fc1" -> "blocks.0.mlp.fc1").
        hits = [c for c in choices if c.endswith(name) or name in c][:n]
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


ORT_MISSING = ("onnxruntime is not installed: pip install 'mixrank[cpu]' for the CPU build, or 'mixrank[gpu]' "
               "for onnxruntime-gpu (NVIDIA GPUs); install one of the two, never both")


def import_onnxruntime():
    """The ``onnxruntime`` module, from whichever build is installed (``onnxruntime`` or
    ``onnxruntime-gpu``: the base package depends on neither).

    Raises:
        MixrankError: neither is installed (one line naming both extras).
    """
    try:
        import onnxruntime
    except ImportError:
        raise MixrankError(ORT_MISSING) from None
    if not hasattr(onnxruntime, "InferenceSession"):  # two builds installed over each other
        raise MixrankError("the onnxruntime module is broken (InferenceSession is missing): two onnxruntime "
                           "builds were installed over each other; pip uninstall -y onnxruntime onnxruntime-gpu, "
                           "then install one of 'mixrank[cpu]' or 'mixrank[gpu]'")
    return onnxruntime
