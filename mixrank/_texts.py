"""Texts for a text model: read from a file (one text per line, or JSON Lines with a
``text`` field), or the calibration and evaluation texts shipped with mixrank (paragraphs
of the Python standard library's docstrings, from disjoint halves of its source files, as
``benchmarks/minilm.py`` builds them); tokenised with the model's own tokenizer into dict
batches, each padded to its longest text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mixrank.core import MixrankError

MAX_LENGTH = 128  # tokens per text, the default of --max-length
MAX_TEXT_BYTES = 100_000  # a longer line is not a text but a mistake (skipped, counted)
SHIPPED = {"calibration": "texts_calibration.txt", "evaluation": "texts_evaluation.txt"}


@dataclass
class Texts:
    """Texts as read, with what was skipped.

    Attributes:
        texts: the texts kept, in file order.
        source: the file, or the shipped set's name.
        read: lines (or JSON objects) read; skipped: ``(line, why)`` of each one left out
            (empty, not decodable, too long, a JSON line without a ``text`` string).
    """

    texts: list[str]
    source: str
    read: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def record(self, used: int, truncated: int, max_length: int) -> dict:
        """What the plan and the report record: texts used, lines read, skipped, and cut
        to ``max_length`` tokens."""
        return {"used": used, "read": self.read, "skipped": len(self.skipped), "truncated": truncated,
                "max_length": max_length,
                "skipped_lines": [n for n, _ in self.skipped[:20]]}


def read_texts(path: str | None, which: str = "calibration") -> Texts:
    """The texts of ``path``: one per line, or JSON Lines (a ``.jsonl`` file, or one whose
    first line is a JSON object) with a ``text`` field; ``None``: the shipped ``which``
    set (``"calibration"`` or ``"evaluation"``).

    Raises:
        MixrankError: a missing or unreadable file, a file that is not UTF-8 text, or one
            with no usable text (the message names the file and why).
    """
    if path is None:
        data = resources.files("mixrank").joinpath("data", SHIPPED[which]).read_text(encoding="utf-8")
        return Texts([t for t in data.splitlines() if t.strip()], f"shipped {which} texts (stdlib docstrings)",
                     len(data.splitlines()))
    p = Path(path)
    if not p.is_file():
        raise MixrankError(f"text file {p} does not exist" if not p.exists() else f"{p} is not a file")
    raw = p.read_bytes()
    if b"\x00" in raw[:65536]:
        raise MixrankError(f"{p} is not a text file (it holds NUL bytes); give one text per line or JSON Lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixrankError(f"{p}: not UTF-8 text (byte {e.start}); give one text per line or JSON Lines") from None
    lines = text.splitlines()
    jsonl = p.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
    out = Texts([], str(p), len(lines))
    for n, line in enumerate(lines, 1):
        t = _one(line, jsonl, out, n)
        if t is not None:
            out.texts.append(t)
    if not out.texts:
        why = f"; first: line {out.skipped[0][0]}: {out.skipped[0][1]}" if out.skipped else ""
        raise MixrankError(f"{p} holds no usable text ({len(lines)} line(s) read, {len(out.skipped)} skipped{why})")
    return out


def _one(line: str, jsonl: bool, out: Texts, n: int) -> str | None:
    """The text of one line, or ``None`` with the reason recorded."""
    if jsonl:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            out.skipped.append((n, "not a JSON object"))
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            out.skipped.append((n, "no 'text' string"))
            return None
        line = obj["text"]
    if not line.strip():
        out.skipped.append((n, "empty"))
        return None
    if len(line.encode("utf-8")) > MAX_TEXT_BYTES:
        out.skipped.append((n, f"longer than {MAX_TEXT_BYTES:,} bytes"))
        return None
    return " ".join(line.split())


def text_batches(tokenizer, texts: list[str], names: tuple[str, ...], max_length: int = MAX_LENGTH,
                 batch: int = 32) -> tuple[list[dict], int]:
    """(dict batches of the model's inputs ``names``, each padded to its longest text; how
    many texts were cut to ``max_length`` tokens).

    Raises:
        MixrankError: a ``max_length`` below 2 or beyond the model's positions.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise MixrankError(f"--max-length must be at least 2 tokens, got {max_length!r}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**9 and max_length > limit:
        raise MixrankError(f"--max-length {max_length} is beyond the model's {limit} positions")
    out, truncated = [], 0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        longer = tokenizer(chunk, truncation=True, max_length=max_length + 1)["input_ids"]
        truncated += sum(len(ids) > max_length for ids in longer)
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({k: enc[k] for k in names if k in enc})
    return out, truncated
