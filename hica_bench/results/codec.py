"""Records as JSON and back: plain JSON values from anything a result holds (:func:`jsonable`), and typed
dataclasses from parsed JSON with every field checked against its annotation (:func:`typed`). Generic: it knows no
schema (:mod:`hica_bench.results.schema` uses it)."""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import fields
from typing import Any, Callable

_NONE = type(None)


def typed(cls: type, values: Any, where: str, strict: bool = False) -> Any:
    """``cls`` (a dataclass) from a JSON object, each field checked against its annotation (``int``, ``float``, ``str``,
    ``bool``, ``X | None``, ``dict``/``list``/``tuple`` of them, enums, nested dataclasses); unknown fields, missing
    fields (``strict``: every field, as :meth:`CellResult.to_json` writes them all; else those without a default), or
    a value of another type raise a ValueError naming the field."""
    return reader(cls, strict)(values, where)


Reader = Callable[[Any, str], Any]


def _fail(where: str, what: str, value: Any) -> ValueError:
    return ValueError(f"{where} must be {what}, got {value!r}"[:300])


@functools.cache
def reader(hint: Any, strict: bool) -> Reader:
    """A reader for values of type ``hint``, built once per type (results files hold thousands of records)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        nullable = _NONE in args
        options = [reader(a, strict) for a in args if a is not _NONE]

        def union(value, where):
            if value is None:
                if nullable:
                    return None
                raise ValueError(f"{where} must not be null")
            errors = []
            for option in options:
                try:
                    return option(value, where)
                except ValueError as exc:
                    errors.append(str(exc))
            raise ValueError(errors[0])
        return union
    if hint is Any:
        return lambda value, where: value
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        public = [f for f in fields(hint) if not f.name.startswith("_")]
        names = {f.name for f in public}
        readers = [(f.name, reader(hints[f.name], strict),
                    strict or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))
                   for f in public]

        def record(value, where):
            if not isinstance(value, dict):
                raise ValueError(f"{where or 'the record'} must be an object, got {type(value).__name__}")
            unknown = set(value) - names
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}" + (f" in {where}" if where else ""))
            arguments = {}
            for name, read, required in readers:
                path = f"{where}.{name}" if where else name
                if name not in value:
                    if required:
                        raise ValueError(f"missing field {path}")
                    continue
                arguments[name] = read(value[name], path)
            return hint(**arguments)
        return record
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = ", ".join(repr(m.value) for m in hint)

        def member(value, where):
            try:
                return hint(value)
            except ValueError:
                raise _fail(where, f"one of {allowed}", value) from None
        return member
    if origin in (list, tuple):
        item = reader(args[0] if args else Any, strict)

        def sequence(value, where):
            if not isinstance(value, list):
                raise ValueError(f"{where} must be a list, got {type(value).__name__}")
            items = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        return sequence
    if origin is dict or hint is dict:
        def mapping(value, where):
            if not isinstance(value, dict):
                raise ValueError(f"{where} must be an object, got {type(value).__name__}")
            return value
        return mapping
    if hint is float:
        def number(value, where):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(where, "a number", value)
            return float(value)
        return number
    if hint is int:
        def whole(value, where):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(where, "a whole number", value)
            return value
        return whole
    if hint in (str, bool):
        def plain(value, where):
            if not isinstance(value, hint):
                raise _fail(where, f"a {hint.__name__}", value)
            return value
        return plain
    raise TypeError(f"no reader for {hint!r}")  # a schema field of a type this reader does not know


#: How deep :func:`jsonable` follows nested containers; deeper ones are written as a marker (a plugin's ``fit_info_``
#: nested 100,000 deep must neither crash the writer nor make a record JSON cannot read back).
MAX_DEPTH = 64
TOO_DEEP = f"<nested deeper than {MAX_DEPTH} levels>"


def jsonable(value: Any, _seen: frozenset = frozenset(), _depth: int = 0) -> Any:
    """``value`` as plain JSON values: records as objects, enums as their value, and whatever a plugin hands over
    (``fit_info_``, options of the components it built): numpy numbers and arrays as numbers and lists, tuples and sets
    as lists, keys that are not text as their ``str``, text that is not valid Unicode with its bad characters replaced,
    a container that contains itself as ``"<circular>"``, containers nested deeper than :data:`MAX_DEPTH` as
    :data:`TOO_DEEP`, anything else as its ``repr``. It never raises, so a finished result can always be written."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot be written as UTF-8
    if isinstance(value, enum.Enum):
        return jsonable(value.value, _seen, _depth)
    if id(value) in _seen:
        return "<circular>"
    if _depth >= MAX_DEPTH:
        return TOO_DEEP
    seen, deeper = _seen | {id(value)}, _depth + 1
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), seen, deeper) for f in fields(value) if not f.name.startswith("_")}
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else str(k)): jsonable(v, seen, deeper) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, seen, deeper) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays, torch tensors
        try:
            return jsonable(value.tolist(), seen, _depth)
        except Exception:
            pass
    try:
        return jsonable(repr(value), seen, _depth)
    except Exception:
        return f"<{type(value).__name__}>"


def known(cls: type, values: dict[str, Any] | None) -> dict[str, Any]:
    """The items of ``values`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (values or {}).items() if k in names}
