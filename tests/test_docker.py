"""Dockerfiles: every COPY source exists, the entrypoint is our console script, and every
command a RUN line calls is one the image provides. (No Docker engine runs here.)"""

import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
KNOWN_COMMANDS = {"pip", "python3", "python", "mixrank"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_three_images():
    assert [f.name for f in FILES] == ["Dockerfile.cpu", "Dockerfile.jetson", "Dockerfile.tensorrt"]


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_dockerfile_refers_to_what_exists(path):
    ins = _instructions(path)
    assert ins[0][0] == "FROM"
    assert path.read_text().lstrip().startswith("#"), "each Dockerfile starts with how to build and run it"
    for op, rest in ins:
        if op == "COPY":
            *srcs, _dst = shlex.split(rest)
            for s in srcs:
                assert (ROOT / s).exists(), f"{path.name}: COPY source {s} does not exist"
        if op == "RUN":
            lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
            cmds, cur = [], []
            for tok in lex:
                if tok in ("&&", ";", "||"):
                    cmds.append(cur)
                    cur = []
                else:
                    cur.append(tok)
            cmds.append(cur)
            for words in cmds:
                assert words and words[0] in KNOWN_COMMANDS, f"{path.name}: unknown command {words!r}"
        if op == "ENTRYPOINT":
            scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
            assert json.loads(rest)[0] in scripts
