"""Griffe extension for the API reference: the docstrings' Sphinx roles as Markdown.

The core's docstrings cross-reference with Sphinx roles (``:class:`~hica_bench.interfaces.Method```) and end
a paragraph before a literal block with ``::``. mkdocstrings renders Markdown, so this turns a role into a
link when its target is rendered on the API pages, into inline code otherwise, and ``::`` into ``:``.
Only the modules in ``RENDERED`` are touched; nothing changes in the code.
"""

from __future__ import annotations

import re

import griffe

RENDERED = ("hica_bench.hookspecs", "hica_bench.interfaces", "hica_bench.testing")
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`<>]+)`")
LITERAL = re.compile(r"::(\s*\n\s*\n)")


def _rendered(collection, path: str) -> bool:
    if not path.startswith(tuple(m + "." for m in RENDERED)) and path not in RENDERED:
        return False
    if any(part.startswith("_") for part in path.split(".")):
        return False
    try:
        target = collection[path]
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return not target.is_alias


def _resolve(collection, obj, target: str) -> str:
    """The full path ``target`` names seen from ``obj`` (as Sphinx would resolve it), or ``target`` itself."""
    scopes = [obj.path, obj.parent.path if obj.parent else "", obj.module.path]
    for scope in scopes:
        if scope:
            candidate = f"{scope}.{target}"
            if _rendered(collection, candidate):
                return candidate
    return target


def _convert(collection, obj) -> None:
    if obj.docstring is None:
        return

    def link(match: re.Match) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        path = target if _rendered(collection, target) else _resolve(collection, obj, target)
        text = path.rsplit(".", 1)[-1] if short else target
        if _rendered(collection, path):
            return f"[`{text}`][{path}]"
        return f"`{text}`"

    value = ROLE.sub(link, obj.docstring.value)
    obj.docstring.value = LITERAL.sub(r":\1", value)


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SphinxRoles(griffe.Extension):
    def _package(self, pkg, loader) -> None:
        collection = loader.modules_collection
        for name in RENDERED:
            try:
                module = collection[name]
            except KeyError:
                continue
            for obj in _walk(module):
                _convert(collection, obj)

    def on_package(self, *, pkg, loader, **kwargs) -> None:  # griffe >= 1.14
        self._package(pkg, loader)

    def on_package_loaded(self, *, pkg, loader, **kwargs) -> None:  # older griffe
        self._package(pkg, loader)
