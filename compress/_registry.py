"""Registries: every extension point is an interface plus a `Registry` of named
implementations, looked up by the name the user gives (docs/design.md, "Extension
points")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ._errors import MixrankError, close_matches

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one interface.

    Register with the decorator ``@REGISTRY.register("name")`` on a class (an instance
    is stored, or the class itself when the registry holds ``classes``) or call
    ``REGISTRY.add("name", obj)``. ``REGISTRY["name"]`` raises a `MixrankError` that
    lists the known names.
    """

    def __init__(self, kind: str, classes: bool = False):
        self.kind = kind
        self.classes = classes
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            obj = cls if self.classes else cls()
            obj.name = name
            self.add(name, obj)
            return cls

        return deco

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests that register a temporary implementation)."""
        return self._items.pop(name)

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise MixrankError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}"
                               f"{close_matches(str(name), self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)
