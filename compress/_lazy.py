"""Package namespaces whose names are imported on first use (PEP 562)."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(namespace: dict, exports: dict[str, tuple[str, ...]]) -> None:
    """Give the package whose globals are ``namespace`` a module ``__getattr__`` that
    imports each public name from its submodule on first access (``exports`` maps a
    relative module name to the names it provides), plus ``__dir__`` and ``__all__``."""
    package = namespace["__name__"]
    where = {name: mod for mod, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(where[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    namespace.update(__getattr__=__getattr__, __dir__=__dir__, __all__=sorted(where))
