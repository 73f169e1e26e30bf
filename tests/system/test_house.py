"""The house as CI checks it: the import contracts hold (`lint-imports`), the documentation site builds without a
warning (`mkdocs build --strict`), and the README stays a short front door (two set-up commands first, <= 150 lines).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.is_file():
        return str(found)
    which = shutil.which(name)
    if which is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return which


def test_the_import_contracts_hold():
    done = subprocess.run([_tool("lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", done.stdout)
    assert kept and int(kept.group(1)) >= 8 and kept.group(2) == "0", done.stdout[-2000:]


def test_the_documentation_site_builds_strictly(tmp_path):
    done = subprocess.run([_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("run", "list", "leaderboard", "merge", "report", "download", "explain", "bench", "check"):
        assert f"hica-bench {command}" in cli  # the CLI reference is generated from every command


def test_the_readme_opens_with_the_two_set_up_commands_and_stays_short():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    first, second = blocks[0].strip(), blocks[1].strip()
    assert first.startswith("python3 -m venv") and "hica-bench run" in first and "\n" not in first
    assert second.startswith("python3 -m venv") and "pytest" in second and "\n" not in second
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert second.split(". .venv/bin/activate && ", 1)[1] in ci  # CI calls the README's test command verbatim
