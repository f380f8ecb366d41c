"""Reading the TOML and JSON files users give (configurations, limits, reports, plans) with
one kind of error, and a bounded depth: a file nested thousands of levels deep is refused
in one line, not with Python's 3,000-line RecursionError."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ._errors import MixrankError

MAX_DEPTH = 64  # no file mixrank reads nests deeper than 6 levels; 64 leaves room for a user's config


def nesting_depth(obj: Any) -> int:
    """How deep lists and dicts nest in ``obj`` (a scalar: 0), found without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, dict | list | tuple):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH + 1:  # no need to walk further than what is refused
                todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def check_depth(obj: Any, where: str) -> Any:
    """``obj``, unless it nests deeper than `MAX_DEPTH`.

    Raises:
        MixrankError: names ``where`` and the limit.
    """
    if nesting_depth(obj) > MAX_DEPTH:
        raise MixrankError(f"{where} nests more than {MAX_DEPTH} levels deep; it is not a file mixrank wrote "
                           "or reads")
    return obj


def loads_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` with a bounded depth (`check_depth`).

    Raises:
        json.JSONDecodeError: not JSON (the caller words the message).
        MixrankError: nested too deeply.
    """
    import json

    try:
        obj = json.loads(text)
    except RecursionError:
        raise MixrankError(f"{where} nests more than {MAX_DEPTH} levels deep; it is not a file mixrank wrote "
                           "or reads") from None
    return check_depth(obj, where)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml_text(path: str | os.PathLike, what: str = "") -> tuple[dict[str, Any], str]:
    """A TOML file as (its table, its text).

    Args:
        path: the file.
        what: what the file is, for the messages (``"limits file"``); ``""``: just its path.

    Raises:
        MixrankError: missing, not a file, not UTF-8 text or not valid TOML (the message
            names the file, and for a syntax error the line).
    """
    p = Path(path)
    name = f"{what} {p}" if what else str(p)
    if not p.is_file():
        raise MixrankError(f"{name} does not exist" if not p.exists() else f"{name} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixrankError(f"{p}: not a UTF-8 text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise MixrankError(f"cannot read {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MixrankError(f"{p}: not valid TOML: {e}") from None
    except RecursionError:
        raise MixrankError(f"{p} nests more than {MAX_DEPTH} levels deep; it is not a file mixrank reads") from None
    return check_depth(data, str(p)), text


def read_toml(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """The TOML file at ``path`` as a dict, or a `MixrankError` naming the file (as ``what``
    and its path, for example ``"limits file"``) and the problem (`read_toml_text`)."""
    return read_toml_text(path, what)[0]
