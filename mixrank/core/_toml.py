"""Reading the TOML files users write (configurations, limits) with one kind of error."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ._errors import MixrankError

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
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise MixrankError(f"{p}: not valid TOML: {e}") from None


def read_toml(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """The TOML file at ``path`` as a dict, or a `MixrankError` naming the file (as ``what``
    and its path, for example ``"limits file"``) and the problem (`read_toml_text`)."""
    return read_toml_text(path, what)[0]
