"""The architecture holds: one installed namespace, imports that only point down, and
extension points that are registries (docs/design.md, "Architecture")."""

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import mixrank
import mixrank.compress
import mixrank.engines
import mixrank.exporter

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"mixrank.compress": 0, "mixrank.exporter": 1, "mixrank.engines": 2, "mixrank": 3}


def _layer(module: str) -> int | None:
    """The layer of a mixrank module (``None`` for anything outside mixrank)."""
    for prefix in ("mixrank.compress", "mixrank.exporter", "mixrank.engines"):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    if module == "mixrank" or module.startswith("mixrank."):
        return LAYERS["mixrank"]
    return None


def _package_files() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (found through the
    packages' own ``__path__``, so the mapping of source folders is what is tested)."""
    out = {}
    for pkg in (mixrank, mixrank.compress, mixrank.exporter, mixrank.engines):
        for folder in pkg.__path__:
            for f in Path(folder).glob("*.py"):
                name = pkg.__name__ if f.stem == "__init__" else f"{pkg.__name__}.{f.stem}"
                out[name] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth (inside
    functions too); ``from x import y`` counts as both ``x`` and ``x.y``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return found


def test_every_import_points_down():
    files = _package_files()
    assert {"mixrank.cli", "mixrank.compress._compress", "mixrank.exporter._rewrite",
            "mixrank.engines._measure"} <= set(files), sorted(files)
    bad = []
    for name, path in files.items():
        own = _layer(name)
        for line, mod in _imports(name, path):
            if mod.split(".")[0] in ("compress", "exporter", "engines"):
                bad.append(f"{path.name}:{line} imports the bare top-level {mod!r}")
            other = _layer(mod)
            if other is not None and other > own and mod not in ("mixrank",):
                bad.append(f"{name} ({path.name}:{line}) imports {mod}, a layer above it")
    assert not bad, "\n".join(bad)


def test_the_walk_finds_an_upward_import(tmp_path):
    """The checker itself: an import inside a function that points up is caught."""
    f = tmp_path / "_probe.py"
    f.write_text("def late():\n    from ..engines import measure\n    return measure\n")
    found = _imports("mixrank.compress._probe", f)
    assert (2, "mixrank.engines") in found and _layer("mixrank.engines") > _layer("mixrank.compress._probe")


@pytest.mark.slow
def test_installed_wheel_has_one_namespace(tmp_path):
    """Build the wheel, install it into a fresh virtual environment and import it from a
    folder outside the source tree: ``mixrank.*`` works, the bare names do not exist."""
    src, dist = tmp_path / "src", tmp_path / "dist"  # build from a copy: setuptools writes build/ in place
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "compress", "exporter", "engines", "mixrank"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / item).is_dir() else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("mixrank-*.whl"))
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = next((env / "lib").glob("python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # the dependencies (torch, onnx, ...) come from this environment's site-packages, added as a
    # plain path: its .pth files (the editable install of the source tree) are not processed
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "zz_deps.pth").write_text(deps + "\n")
    code = (
        "import importlib.util, sys, mixrank, mixrank.compress, mixrank.exporter, mixrank.engines, mixrank.cli\n"
        "assert mixrank.compress.__file__.startswith(sys.prefix), mixrank.compress.__file__\n"
        "assert callable(mixrank.compress.compress_model) and callable(mixrank.engines.measure)\n"
        "for bare in ('compress', 'exporter', 'engines'):\n"
        "    assert importlib.util.find_spec(bare) is None, bare + ' is importable'\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True,
                           text=True).stdout
    assert "mixrank/compress/_compress.py" in names and "\ncompress/" not in names


def test_registries_name_every_builtin():
    from mixrank.compress import ALLOCATORS, FACTORIZERS, METHODS, REFINEMENTS, SPARSE, MixrankError
    from mixrank.engines import RUNNERS

    assert set(METHODS.names()) == {"mixrank", "whiten", "svd", "asvd", "oats"}
    assert set(FACTORIZERS.names()) == {"whiten", "svd", "asvd", "oats"}
    assert set(ALLOCATORS.names()) == {"uniform", "search"}
    assert set(REFINEMENTS.names()) == {"sparse", "compensate", "sequential", "distill", "qdistill"}
    assert set(SPARSE.names()) == {"channel", "row"}
    assert set(RUNNERS.names()) == {"onnxruntime", "tensorrt"}
    with pytest.raises(MixrankError, match=r"unknown engine 'tensorrtt'.*did you mean: tensorrt"):
        RUNNERS["tensorrtt"]


def test_an_engine_process_does_not_import_torch():
    """The peak-memory probe runs in its own process and must measure the engine, not
    torch: the engines' runner modules import neither torch nor the exporter."""
    code = ("import sys, mixrank.engines._runner, mixrank.engines._memprobe\n"
            "from mixrank.compress import MixrankError, atomic_write\n"
            "heavy = [m for m in ('torch', 'onnx', 'mixrank.exporter', 'timm') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
