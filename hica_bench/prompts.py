"""Prompt files: a dataset's class names, prompt templates and descriptors, given by the user for any dataset.

``hica-bench run --datasets breastmnist:prompts=my.yaml`` (or ``folder:root=...:prompts=busi.yaml``) reads a YAML
(``.yaml``/``.yml``) or JSON (``.json``) file with these keys, all optional but at least one::

    classnames:          # the names put into text, one per class: a list in the dataset's class order,
      benign: benign breast tumour      # or a mapping from each of the dataset's class names
      malignant: malignant breast tumour
    templates:           # the prompt ensemble; {} is the class name
      - "a breast ultrasound image showing {}."
    descriptors:         # per class (keyed by the dataset's class name or its classname above)
      benign:
        global: ["an oval, circumscribed, hypoechoic mass"]
        local: ["a smooth, well-defined margin"]

The file is checked against the dataset before anything runs (one line, exit 2, for any problem). Its content digest
(:attr:`hica_bench.interfaces.Prompts.digest`) is part of every cell identity; who uses what is documented on
:class:`hica_bench.interfaces.Prompts`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Sequence

from hica_bench.errors import UserError
from hica_bench.files import digest, read_config, short
from hica_bench.interfaces import Prompts

KEYS = ("classnames", "templates", "descriptors")
MAX_TEMPLATE = 1000  #: characters in one template
SUFFIXES = (".yaml", ".yml", ".json")


def load(path: str | Path, class_names: Sequence[str], dataset: str) -> Prompts:
    """The prompt file ``path`` for ``dataset``, whose classes are ``class_names`` (in label order), checked."""
    where = f"prompt file {path}"
    raw = read_config(Path(path).expanduser(), where, SUFFIXES)

    def fail(message: str) -> None:
        raise UserError(f"{where}: {message}")

    if not isinstance(raw, dict) or not raw:
        fail(f"must hold at least one of {', '.join(KEYS)} at the top level")
    unknown = [str(k) for k in raw if k not in KEYS]
    if unknown:
        fail(f"unknown key {short(unknown[0])} (known: {', '.join(KEYS)})")
    names = list(class_names)
    classnames = _classnames(raw.get("classnames"), names, dataset, fail)
    templates = _templates(raw.get("templates"), fail)
    descriptors = _descriptors(raw.get("descriptors"), names, classnames, fail)
    content = {"classnames": classnames, "templates": templates, "descriptors": descriptors}
    return Prompts(tuple(classnames), None if templates is None else tuple(templates),
                   None if descriptors is None else tuple(descriptors), str(path), digest(content))


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _classnames(value: Any, names: list[str], dataset: str, fail) -> list[str]:
    if value is None:
        return names
    if isinstance(value, list):
        if len(value) != len(names):
            fail(f"classnames has {len(value)} names but {dataset} has {len(names)} classes ({', '.join(names)}); "
                 "give one per class in that order, or a mapping from each class name")
        if not all(_text(v) for v in value):
            fail("classnames must be non-empty strings")
        return [v.strip() for v in value]
    if isinstance(value, dict):
        value = {str(k): v for k, v in value.items()}  # YAML reads class 0 as the number 0
        keys = list(value)
        missing = [n for n in names if n not in keys]
        extra = [k for k in keys if k not in names]
        if missing or extra:
            fail(f"classnames maps {', '.join(keys) or 'nothing'} but {dataset}'s classes are {', '.join(names)}"
                 + (f" (missing: {', '.join(missing)})" if missing else "") + (f" (unknown: {', '.join(extra)})" if extra else ""))
        if not all(_text(v) for v in value.values()):
            fail("classnames must map each class to a non-empty string")
        return [value[n].strip() for n in names]
    fail(f"classnames must be a list or a mapping, got {type(value).__name__}")


def _templates(value: Any, fail) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(_text(v) for v in value):
        fail("templates must be a non-empty list of non-empty strings")
    for template in value:
        if len(template) > MAX_TEMPLATE:
            fail(f"template {short(template)} is {len(template):,} characters; a template may have {MAX_TEMPLATE:,}")
        try:  # parsed, never formatted with what it asks for ({:>99999999999} would allocate that much)
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]
        except ValueError:
            fields = None
        if fields is None or any(field != ("", "", None) for field in fields):
            fail(f"template {short(template)} must use {{}} for the class name and no other braces, format specs or "
                 "conversions (write {{ for a brace)")
        if len(fields) != 1:
            fail(f"template {short(template)} must hold {{}} exactly once, where the class name goes")
    return list(value)


def _descriptors(value: Any, names: list[str], classnames: list[str], fail) -> list[dict | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        fail("descriptors must map class names to {global: [...], local: [...]}")
    out: list[dict | None] = [None] * len(names)
    for key, entry in value.items():
        key = str(key)
        index = names.index(key) if key in names else classnames.index(key) if key in classnames else None
        if index is None:
            fail(f"descriptors names {short(key)}, which is none of the classes ({', '.join(names)})")
        if out[index] is not None:
            fail(f"descriptors gives class {names[index]!r} twice")
        if not isinstance(entry, dict) or set(entry) - {"global", "local"}:
            fail(f"descriptors.{key} must have only 'global' and 'local' lists")
        global_, local = entry.get("global", []), entry.get("local", [])
        for part, texts in (("global", global_), ("local", local)):
            if not isinstance(texts, list) or not all(_text(t) for t in texts):
                fail(f"descriptors.{key}.{part} must be a list of non-empty strings")
        if not global_:
            fail(f"descriptors.{key}.global must hold at least one text")
        out[index] = {"global": tuple(global_), "local": tuple(local)}
    return out
