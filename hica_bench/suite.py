"""Suites as files: the exact grid of a paper kept under version control (as lm-eval keeps task configs).

A suite is a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file with these keys, all optional::

    datasets = ["breastmnist", "pneumoniamnist"]          # specs as on the command line, NAME:opt=value
    methods  = ["linear-probe", "prototype:temperature=0.1"]
    encoders = ["effnet-lite0-minilm"]                     # several: the grid runs over each
    shots    = [1, 5, 20]
    seeds    = [0, 1, 2]
    size     = 28
    max_test = 200
    out      = "runs/default"                              # relative paths are taken from the working folder
    corruptions = ["all"]                                  # robustness track (--corruptions): all, or names
    severities  = [1, 2, 3, 4, 5]

A list may also be written as one comma string (``shots = "1,5,20"``). ``hica-bench run --suite FILE`` reads it; a
flag given on the command line overrides the suite's value. An unknown key or a value of the wrong type is one line
naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hica_bench.errors import UserError
from hica_bench.files import read_config, short


@dataclass
class Suite:
    datasets: list[str] | None = None
    methods: list[str] | None = None
    encoders: list[str] | None = None
    shots: list[int] | None = None
    seeds: list[int] | None = None
    size: int | None = None
    max_test: int | None = None
    out: str | None = None
    corruptions: list[str] | None = None
    severities: list[int] | None = None
    protocols: list[str] | None = None


KEYS = tuple(f.name for f in fields(Suite))
_NAMES = ("datasets", "methods", "encoders", "corruptions", "protocols")
_NUMBERS = ("shots", "seeds", "severities")


def load(path: str | Path) -> Suite:
    """The suite in ``path``; :class:`UserError` (one line) for a missing or malformed file, an unknown key or a bad value."""
    path = Path(path)
    where = f"suite {path}"
    raw = read_config(path, where, (".toml", ".yaml", ".yml"))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{where}: must hold keys and values at the top level, got a {type(raw).__name__}")
    suite = Suite()
    for key, value in raw.items():
        if key not in KEYS:
            raise UserError(f"{where}: unknown key {short(str(key))} (known: {', '.join(KEYS)})")
        setattr(suite, key, _value(where, key, value))
    return suite


def int_list(text: str, option: str) -> list[int]:
    """A flag's ``"1,5,20"`` -> [1, 5, 20] (order kept, duplicates dropped)."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{option} takes comma-separated whole numbers like 1,5,20; got {short(text)}") from None
        if value not in values:
            values.append(value)
    return values


def name_list(text: str, option: str) -> list[str]:
    """A flag's ``"a,b:opt=1"`` -> ["a", "b:opt=1"]; empty names or a name given twice are a UserError."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise UserError(f"{option} takes a comma-separated list of names; got {short(text)}")
    if len(set(names)) != len(names):
        raise UserError(f"{option} names something twice: {short(text)}")
    return names


def _value(where: str, key: str, value: Any) -> Any:
    def bad(expected: str) -> UserError:
        return UserError(f"{where}: {key} must be {expected}, got {short(value)}")

    if key in _NAMES or key in _NUMBERS:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise bad("a non-empty list" + (" of names" if key in _NAMES else " of whole numbers"))
        if key in _NAMES:
            if not all(isinstance(i, str) and i.strip() for i in items):
                raise bad("a non-empty list of names (NAME or NAME:opt=value)")
            names = [i.strip() for i in items]
            if len(set(names)) != len(names):
                raise bad("a list without repeats")
            return names
        numbers = []
        for item in items:
            if isinstance(item, str) and item.strip().lstrip("-").isdigit():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int):
                raise bad("a non-empty list of whole numbers")
            if item not in numbers:
                numbers.append(item)
        return numbers
    if key in ("size", "max_test"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("a whole number >= 1")
        return value
    if not isinstance(value, str) or not value.strip():  # out
        raise bad("a folder path")
    return value
