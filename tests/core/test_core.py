"""The core layer: registries with lazy entries, records that keep exactly their keys, and
lazy package namespaces."""

import json
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest

from mixrank.core import MixrankError, Record, Registry, lazy_exports


def test_a_lazy_entry_is_imported_on_first_lookup(tmp_path, monkeypatch):
    (tmp_path / "lazy_probe_mod.py").write_text("class Impl:\n    made = 0\n    def __init__(self):\n"
                                                "        Impl.made += 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("probe")
    reg.add_lazy("impl", "lazy_probe_mod:Impl")
    assert "impl" in reg and reg.names() == ("impl",) and "lazy_probe_mod" not in sys.modules
    assert reg.lazy_targets() == [("lazy_probe_mod:Impl", None)]
    obj = reg["impl"]
    assert type(obj).__name__ == "Impl" and obj.name == "impl" and reg["impl"] is obj  # one instance, named
    assert sys.modules["lazy_probe_mod"].Impl.made == 1 and reg.lazy_targets() == []
    classes = Registry("probe class", classes=True)
    classes.add_lazy("impl", "lazy_probe_mod:Impl")
    assert classes["impl"] is sys.modules["lazy_probe_mod"].Impl
    with pytest.raises(ValueError, match="registered twice"):
        reg.add_lazy("impl", "lazy_probe_mod:Impl")
    with pytest.raises(MixrankError, match=r"unknown probe 'imp'.*did you mean: impl"):
        reg["imp"]  # noqa: B018
    with pytest.raises(MixrankError, match="unknown probe"):
        reg[["not", "hashable"]]


@dataclass(eq=False)
class _Rec(Record):
    _optional: ClassVar[frozenset[str]] = frozenset({"note"})

    name: str
    score: float | None
    note: str | None = None


def test_a_record_is_its_json_object_and_leaves_out_unset_optional_fields():
    r = _Rec("a", 1.5)
    assert json.loads(json.dumps(r)) == {"name": "a", "score": 1.5} and r.note is None
    r.note = "why"
    assert r["note"] == "why" and json.loads(json.dumps(r))["note"] == "why"
    r.note = None
    assert "note" not in r
    back = _Rec.from_dict({"name": "b", "extra": [1]})
    assert back.score is None and back["extra"] == [1] and back.to_dict() == {"name": "b", "score": None,
                                                                              "extra": [1]}


def test_lazy_exports_import_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_export_mod.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ns = types.ModuleType("lazy_pkg_probe")
    lazy_exports(ns.__dict__, {"lazy_export_mod": ("VALUE",)}, modules={"mod": "lazy_export_mod"})
    assert "lazy_export_mod" not in sys.modules and ns.__all__ == ["VALUE", "mod"]
    assert ns.VALUE == 42 and ns.mod is sys.modules["lazy_export_mod"]
    with pytest.raises(AttributeError):
        ns.nothing  # noqa: B018


def test_a_killed_writers_temporary_folder_is_removed_on_the_next_write(tmp_path):
    """issue 27: ``kill -9`` inside `atomic_write` left ``.<name>.*.tmp/`` forever. The next
    write in that folder removes a folder of our naming whose process is gone, and leaves a
    live writer's alone."""
    import os
    import subprocess

    from mixrank.core import atomic_write_text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".mixrank-{dead.pid}-abc.tmp"
    stale.mkdir()
    (stale / "report.json").write_text("half")
    live = tmp_path / f".mixrank-{os.getpid()}-def.tmp"
    live.mkdir()
    mine = tmp_path / ".mixrank-notes.tmp"  # not a pid: not ours to judge
    mine.mkdir()
    atomic_write_text(tmp_path / "report.json", "{}")
    assert not stale.exists() and live.exists() and mine.exists()
    assert (tmp_path / "report.json").read_text() == "{}"


def test_a_name_of_255_bytes_is_written_and_a_longer_one_refused_in_one_line(tmp_path):
    from mixrank.core import atomic_write_text, check_writable_path

    name = "n" * 250 + ".json"
    atomic_write_text(tmp_path / name, "{}")  # the temporary folder's name no longer grows with it
    assert (tmp_path / name).read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with pytest.raises(MixrankError, match="allows 255"):
        check_writable_path(tmp_path / ("n" * 300))
    with pytest.raises(MixrankError, match="cannot write"):
        check_writable_path(tmp_path / "/".join(["d" * 200] * 30))  # past PATH_MAX as a whole
