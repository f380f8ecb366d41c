"""Package namespaces whose names are imported on first use (PEP 562)."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(namespace: dict, exports: dict[str, tuple[str, ...]],
                 modules: dict[str, str] | None = None) -> None:
    """Give the package whose globals are ``namespace`` a module ``__getattr__`` that
    imports each public name on first access, plus ``__dir__`` and ``__all__``.

    Args:
        namespace: the package's ``globals()``.
        exports: module name (relative to the package, or absolute) → the names it provides.
        modules: public names that stand for a whole module (name → module), e.g.
            ``{"distributed": ".calibrate._dist"}``.
    """
    package = namespace["__name__"]
    where = {name: mod for mod, names in exports.items() for name in names}
    modules = dict(modules or {})

    def __getattr__(name: str):
        if name in modules:
            value = import_module(modules[name], package)
        elif name in where:
            value = getattr(import_module(where[name], package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where, *modules})

    namespace.update(__getattr__=__getattr__, __dir__=__dir__, __all__=sorted({*where, *modules}),
                     __lazy_exports__=(exports, modules))
