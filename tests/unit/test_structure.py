"""The house's rules that import-linter does not check: no module reaches into another module's private names.

A name that starts with one underscore is its module's own business (PEP 8); a module that needs it from elsewhere
needs a public name instead. Checked on the source of the core, the first-party plugins, the benchmarks and the
tests: ``from m import _x`` and ``m._x`` where ``m`` is a module of this repository bound by an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = [REPO / "hica_bench", REPO / "benchmarks", REPO / "tests", *sorted((REPO / "plugins").glob("*"))]
#: where the repository's modules live (a plugin distribution's package sits in plugins/<dist>/)
PACKAGE_DIRS = [REPO, *sorted(p for p in (REPO / "plugins").glob("*") if p.is_dir())]


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_project_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return any((base.joinpath(*parts).with_suffix(".py")).is_file() or (base.joinpath(*parts) / "__init__.py").is_file()
               for base in PACKAGE_DIRS)


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    modules: set[str] = set()  # local names bound to modules of this repository
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_project_module(alias.name):
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
                elif is_project_module(f"{node.module}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = [path for root in ROOTS for path in sorted(root.rglob("*.py")) if ".venv" not in path.parts]
    assert len(files) > 80  # the whole tree was read
    found = [line for path in files for line in violations(path)]
    assert not found, "private names used from another module (make them public, or keep the use inside):\n" + \
        "\n".join(found)


def test_the_check_finds_both_spellings(tmp_path):
    """The rule itself: both a private import and a private attribute of an imported project module are found; a
    private name of one's own module and a dunder are not."""
    sample = tmp_path / "sample.py"
    sample.write_text("from hica_bench.results.store import _whole_record\nfrom hica_bench import plan\n"
                      "plan._hidden\nimport os\nos._exit\n_local = 1\nplan.__name__\n")
    found = violations(sample)
    assert [line.split(": ", 1)[1] for line in found] == ["from hica_bench.results.store import _whole_record",
                                                         "plan._hidden"]
