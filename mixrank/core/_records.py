"""Typed records that are also JSON objects: the plan of a factors file, allocation
candidates, refinement variants and measurements are each a dataclass whose instances
are the ``dict`` they serialise to, so ``json.dumps(record)`` writes the file's object and
``record.field`` reads it with a type."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar

from ._errors import MixrankError


class Record(dict):
    """A dataclass that is also a JSON object.

    Subclasses are ``@dataclass(eq=False)`` with typed fields. `from_dict` supplies the
    zero value of a field's type where an object does not mention it; keys a class does
    not declare are kept (a newer writer's). Class attributes:

    - ``_nested``: field → the `Record` type of its value;
    - ``_tables``: field → the `Record` type of the values of a ``{name: record}`` table;
    - ``_zeros``: field → its value when absent, where that is not its type's zero;
    - ``_optional``: fields left out of the JSON object while they are ``None`` (the
      attribute still reads ``None``), so that an object keeps exactly the keys it had.
    """

    _nested: ClassVar[dict[str, type]] = {}
    _tables: ClassVar[dict[str, type]] = {}
    _zeros: ClassVar[dict[str, Any]] = {}
    _optional: ClassVar[frozenset[str]] = frozenset()

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dataclass_fields__:
            value = self._coerce(key, value)
            if value is None and key in self._optional:
                dict.pop(self, key, None)
            else:
                dict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.__dataclass_fields__:
            setattr(self, key, value)
        else:
            dict.__setitem__(self, key, value)

    def _coerce(self, key: str, value: Any) -> Any:
        if key in self._nested and isinstance(value, dict) and not isinstance(value, self._nested[key]):
            return self._nested[key].from_dict(value)
        if key in self._tables and isinstance(value, dict) and not isinstance(value, Table):
            return Table(self._tables[key], value)
        return value

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Read a record; a field the writer did not write (an older format, a partial
        object) reads as the zero value of its type, keys this version does not know are
        kept.

        Raises:
            MixrankError: ``d`` is not an object.
        """
        if not isinstance(d, dict):
            raise MixrankError(f"malformed plan: expected an object for {cls.__name__}, got "
                               f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for n in names & set(d):
            if not _fits(hints[n], d[n]):
                raise MixrankError(f"malformed plan: {cls.__name__}.{n} must be {_type_name(hints[n])}, got "
                                   f"{_short(d[n])}")
        values = {n: d[n] if n in d else cls._zeros.get(n, zero_of(hints[n])) for n in names}
        obj = cls(**values)
        for k, v in d.items():
            if k not in names:
                dict.__setitem__(obj, k, v)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict deep copy (what ``json.loads(json.dumps(self))`` gives)."""
        return json.loads(json.dumps(self))

    def __reduce__(self):  # copy and pickle through the dict form
        return (self.__class__.from_dict, (dict(self),))


def _fits(tp, value: Any) -> bool:
    """Whether ``value`` (read from JSON) has the field type ``tp``: its outer type only
    (``list[int]`` asks for a list), an int where a float is asked, never a bool for a
    number, and an object for a nested `Record`."""
    import types

    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        return any(_fits(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    base = origin or tp
    if isinstance(base, type) and issubclass(base, Record):
        return isinstance(value, dict)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(base, type):
        return isinstance(value, base)
    return True


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def zero_of(tp) -> Any:
    """The value a field of type ``tp`` has when an object does not mention it."""
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict({})
    origin = typing.get_origin(tp) or tp
    if type(None) in typing.get_args(tp):
        return None
    return {int: 0, float: 0.0, str: "", bool: False, list: [], dict: {}}[origin]


class Table(dict):
    """``{name: record}`` whose values are coerced to one `Record` type on insertion."""

    def __init__(self, kind: type, items: dict | None = None):
        super().__init__()
        self.kind = kind
        for k, v in (items or {}).items():
            self[k] = v

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise MixrankError(f"malformed plan: the entry {_short(key)} must be an object ({self.kind.__name__}), "
                               f"got {_short(value)}")
        if not isinstance(value, self.kind):
            try:
                value = self.kind.from_dict(value)
            except MixrankError as e:  # name the entry (the layer) as well as the field
                raise MixrankError(f"{str(e).replace('malformed plan: ', f'malformed plan: entry {_short(key)}: ', 1)}"
                                   ) from None
        dict.__setitem__(self, key, value)

    def __reduce__(self):
        return (Table, (self.kind, dict(self)))
