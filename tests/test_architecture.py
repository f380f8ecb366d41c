"""The architecture holds: one installed namespace, a core layer at the bottom, imports that
only point down, no import cycle, no module reaching into another package's private
modules, and extension points that are registries (docs/design.md, "Architecture")."""

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"mixrank.core": 0, "mixrank.compress": 1, "mixrank.exporter": 2, "mixrank.engines": 3, "mixrank": 4}


def _layer(module: str) -> int | None:
    """The layer of a mixrank module (``None`` for anything outside mixrank)."""
    for prefix in ("mixrank.core", "mixrank.compress", "mixrank.exporter", "mixrank.engines"):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    if module == "mixrank" or module.startswith("mixrank."):
        return LAYERS["mixrank"]
    return None


def _package_files() -> dict[str, Path]:
    """Every module of the installed package by its dotted name, found recursively through
    the packages' own ``__path__`` (so the mapping of source folders is what is tested)."""
    import pkgutil

    import mixrank.compress
    import mixrank.engines
    import mixrank.exporter

    out = {}
    for pkg in (mixrank, mixrank.compress, mixrank.exporter, mixrank.engines):
        out[pkg.__name__] = Path(pkg.__file__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            last = info.name.rpartition(".")[2]
            folder = Path(info.module_finder.path)
            out[info.name] = folder / last / "__init__.py" if info.ispkg else folder / f"{last}.py"
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(tree: ast.AST):
    """Every node, at any depth (inside functions too), but the bodies of ``if
    TYPE_CHECKING:`` (annotations only: they never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not _is_type_checking(child):
                todo.append(child)


def _resolve(package: str, level: int, module: str | None) -> str:
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, modules: set[str] | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth; ``from x import
    y`` is an import of the module ``x.y`` where that is a module (``modules``), else of
    ``x`` (when ``modules`` is ``None``: both). Registry lazy entries
    (``REGISTRY.add_lazy(name, "module:attr", __name__)``) are imports of their module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(package, node.level, node.module) if node.level else node.module
            subs = [f"{mod}.{a.name}" for a in node.names]
            if modules is None:
                found += [(node.lineno, mod)] + [(node.lineno, s) for s in subs]
            else:
                hits = [s for s in subs if s in modules]
                found += [(node.lineno, s) for s in hits]
                if len(hits) < len(subs):
                    found.append((node.lineno, mod))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_lazy" and len(node.args) >= 2:
            target = node.args[1]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                mod = target.value.partition(":")[0]
                level = len(mod) - len(mod.lstrip("."))
                found.append((node.lineno, _resolve(package, level, mod.lstrip(".") or None) if level else mod))
    return found


def _lazy_edges(name: str) -> list[str]:
    """The modules a package's `lazy_exports` table imports on first use."""
    import importlib

    module = importlib.import_module(name)
    exports, modules = getattr(module, "__lazy_exports__", ({}, {}))
    return [importlib.util.resolve_name(m, name) for m in [*exports, *modules.values()]]


def _graph() -> dict[str, set[str]]:
    """mixrank module → the mixrank modules it imports (any depth, lazy tables and lazy
    registry entries included). Importing ``a.b.c`` also runs ``a`` and ``a.b``; those
    implicit imports of parent packages are not edges: a package's ``__init__`` importing
    its own implementations, which import their siblings, is the registration pattern."""
    files = _package_files()
    graph = {}
    for name, path in files.items():
        edges = {m for _, m in _imports(name, path, set(files)) if _layer(m) is not None}
        if path.stem == "__init__":
            edges |= set(_lazy_edges(name))
        graph[name] = {m for m in edges if m in files and m != name} | ({name} & edges)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, and self-imports
    (Tarjan's algorithm, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1 or node in graph.get(node, ()):
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _private_owner(module: str) -> str | None:
    """The package whose private module ``module`` is (the package above its first
    ``_name`` part), or ``None`` for a public module."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and not p.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_every_import_points_down():
    files = _package_files()
    assert {"mixrank.cli", "mixrank.core", "mixrank.compress._pipeline", "mixrank.compress.allocate._search",
            "mixrank.compress.factor.forms._pairwise", "mixrank.exporter._rewrite", "mixrank.engines._measure",
            "mixrank.engines.runners._tensorrt"} <= set(files), sorted(files)
    bad = []
    for name, path in files.items():
        own = _layer(name)
        for line, mod in _imports(name, path):
            if mod.split(".")[0] in ("compress", "exporter", "engines", "core"):
                bad.append(f"{path.name}:{line} imports the bare top-level {mod!r}")
            other = _layer(mod)
            if other is not None and other > own and mod != "mixrank":
                bad.append(f"{name} ({path.name}:{line}) imports {mod}, a layer above it")
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_packages_private_module():
    files = _package_files()
    bad = []
    for name, path in files.items():
        for line, mod in _imports(name, path, set(files)):
            owner = _private_owner(mod)
            if owner is not None and _layer(mod) is not None and not (name == owner or name.startswith(owner + ".")):
                bad.append(f"{name} ({path.name}:{line}) imports {mod}, private to {owner}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 60 and sum(len(e) for e in graph.values()) > 150, "the walk found too little"
    assert _cycles(graph) == []


def test_the_checkers_find_what_they_look_for(tmp_path):
    """The checkers themselves: an upward import inside a function, a lazy registry entry,
    a private import across packages, and cycles (direct, long, and a self-import)."""
    f = tmp_path / "_probe.py"
    f.write_text("def late():\n    from ..engines import measure\n    return measure\n"
                 "R.add_lazy('x', '.runners._y:Y', __name__)\n")
    found = _imports("mixrank.compress._probe", f)
    assert (2, "mixrank.engines") in found and _layer("mixrank.engines") > _layer("mixrank.compress._probe")
    assert (4, "mixrank.compress.runners._y") in found
    assert _private_owner("mixrank.compress.calibrate._stats") == "mixrank.compress.calibrate"
    assert _private_owner("mixrank.compress.calibrate.distributed") is None
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    g = tmp_path / "_tc.py"
    g.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mixrank.cli import main\n")
    assert all(m != "mixrank.cli" for _, m in _imports("mixrank.compress._tc", g))


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
        "import mixrank.core, mixrank.compress.factor.forms, mixrank.engines.runners\n"
        "assert mixrank.compress.__file__.startswith(sys.prefix), mixrank.compress.__file__\n"
        "assert callable(mixrank.compress.compress_model) and callable(mixrank.engines.measure)\n"
        "assert mixrank.compress.FORMS.names() == ('lowrank', 'rows', 'cols', 'residual')\n"
        "for bare in ('compress', 'exporter', 'engines', 'core'):\n"
        "    assert importlib.util.find_spec(bare) is None, bare + ' is importable'\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True,
                           text=True).stdout
    assert "mixrank/compress/_pipeline.py" in names and "\ncompress/" not in names
    assert "mixrank/compress/factor/forms/_lowrank.py" in names and "mixrank/core/_registry.py" in names


def test_registries_name_every_builtin():
    from mixrank.compress import ALLOCATORS, FACTORIZERS, FORMS, METHODS, PAIRINGS, REFINEMENTS, SPARSE, MixrankError
    from mixrank.engines import RUNNERS

    assert set(METHODS.names()) == {"mixrank", "whiten", "svd", "asvd", "oats", "quantize"}
    assert set(FACTORIZERS.names()) == {"whiten", "svd", "asvd", "oats"}
    assert set(ALLOCATORS.names()) == {"uniform", "search", "dense"}
    assert set(REFINEMENTS.names()) == {"sparse", "compensate", "sequential", "distill", "qdistill"}
    assert set(SPARSE.names()) == {"channel", "row"}
    assert set(FORMS.names()) == {"lowrank", "rows", "cols", "residual"}
    assert PAIRINGS.names() == ("bert", "timm-mlp")  # in this order: the first rule that claims a layer keeps it
    assert set(RUNNERS.names()) == {"onnxruntime", "tensorrt"}
    with pytest.raises(MixrankError, match=r"unknown engine 'tensorrtt'.*did you mean: tensorrt"):
        RUNNERS["tensorrtt"]


def test_an_engine_process_does_not_import_torch():
    """The peak-memory probe runs in its own process and must measure the engine, not
    torch: the engines' runners import neither torch nor the exporter, and neither does
    the core layer nor the TensorRT runner's lazy entry until it is looked up."""
    code = ("import sys, mixrank.engines.runners, mixrank.engines._memprobe\n"
            "from mixrank.core import MixrankError, atomic_write\n"
            "from mixrank.compress import MixrankError as E2, JOB_BYTES\n"
            "heavy = [m for m in ('torch', 'onnx', 'mixrank.exporter', 'timm', 'mixrank.engines.runners._tensorrt')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
