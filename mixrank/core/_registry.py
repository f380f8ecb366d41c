"""Registries: every extension point is an interface plus a `Registry` of named
implementations, looked up by the name the user gives (docs/design.md, "Extension
points")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Generic, TypeVar

from ._errors import MixrankError, close_matches

T = TypeVar("T")


class _Lazy:
    """A registered name whose implementation is imported on first lookup."""

    def __init__(self, target: str, package: str | None):
        self.target, self.package = target, package

    def load(self):
        """The implementation, imported now."""
        module, _, attr = self.target.partition(":")
        return getattr(import_module(module, self.package), attr)


class Registry(Generic[T]):
    """Named implementations of one interface.

    Register with the decorator ``@REGISTRY.register("name")`` on a class (an instance
    is stored, or the class itself when the registry holds ``classes``), call
    ``REGISTRY.add("name", obj)``, or name an implementation without importing it:
    ``REGISTRY.add_lazy("name", "module:Class")`` (imported, and instantiated unless the
    registry holds ``classes``, on first lookup; for engines whose module is only needed
    where they run). ``REGISTRY["name"]`` raises a `MixrankError` that lists the known
    names.

    Args:
        kind: what the implementations are, for error messages (``"sparse structure"``).
        classes: store the registered classes themselves rather than one instance each.
    """

    def __init__(self, kind: str, classes: bool = False):
        self.kind = kind
        self.classes = classes
        self._items: dict[str, T | _Lazy] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``. Raises ``ValueError`` when the name is taken."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def add_lazy(self, name: str, target: str, package: str | None = None) -> None:
        """Register ``target`` (``"module:attribute"``; a relative module with ``package``)
        under ``name`` without importing it."""
        self.add(name, _Lazy(target, package))

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: register the class (or an instance of it) under ``name`` and set
        its ``name`` attribute."""
        def deco(cls: type) -> type:
            self.add(name, self._made(cls, name))
            return cls

        return deco

    def _made(self, cls: type, name: str):
        obj = cls if self.classes else cls()
        obj.name = name
        return obj

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests that register a temporary implementation)."""
        return self._items.pop(name)

    def lazy_targets(self) -> list[tuple[str, str | None]]:
        """``(target, package)`` of every entry not imported yet (the architecture test
        counts them as imports)."""
        return [(v.target, v.package) for v in self._items.values() if isinstance(v, _Lazy)]

    def __getitem__(self, name: str) -> T:
        try:
            obj = self._items[name]
        except (KeyError, TypeError):
            raise MixrankError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}"
                               f"{close_matches(str(name), self._items)}") from None
        if isinstance(obj, _Lazy):
            obj = self._items[name] = self._made(obj.load(), name)
        return obj

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items  # a list given as a name is not one, not a crash

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)
