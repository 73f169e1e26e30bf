"""``hica-bench history`` and the report's history section on a real tiny run (prototype, 1 shot, three seeds, real
BreastMNIST, the pixels test encoder), copied as three commits, one with a 5-point drop of accuracy; bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import invoke, prototype_run

REPO = Path(__file__).resolve().parents[2]
#: commit -> (hash, commit time, ACC change); given in the order c, a, b
COMMITS = {"a": ("a" * 40, "2026-12-01T10:00:00+00:00", 0.0),
           "b": ("b" * 40, "2026-12-02T10:00:00+01:00", -0.05),
           "c": ("c" * 40, "2026-12-03T10:00:00+00:00", 0.0)}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _as_commit(records: list[dict], name: str, harness: str | None = None) -> list[dict]:
    git, when, change = COMMITS[name]
    out = []
    for record in json.loads(json.dumps(records)):
        record["environment"]["git"], record["environment"]["git_time"] = git, when
        record["metrics"]["acc"] = max(0.0, record["metrics"]["acc"] + change)
        if harness:  # another hica-bench version: another origin, so other cell ids (what `report` can merge)
            record["identity"]["origin"]["harness"] = harness
            record["environment"]["packages"]["hica-bench"] = harness
        out.append(record)
    return out


@pytest.fixture(scope="module")
def run(medmnist_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("history")
    prototype_run(medmnist_root, root / "cache", root / "run", "0,1,2")
    return root


@pytest.fixture(scope="module")
def commits(run) -> dict[str, Path]:
    records = _records(run / "run" / "results.jsonl")
    assert len(records) == 3 and all(r["status"] == "ok" and r["metrics"]["acc"] > 0.2 for r in records)
    return {name: _write(run / "commits" / name, _as_commit(records, name)) for name in ("c", "a", "b")}


def test_a_run_in_a_git_checkout_records_the_commit_and_its_time(run):
    git = subprocess.run(["git", "show", "-s", "--format=%H %cI", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout")
    for record in _records(run / "run" / "results.jsonl"):
        assert record["schema_version"] == 11
        assert f"{record['environment']['git']} {record['environment']['git_time']}" == git.stdout.strip()


def test_history_orders_gates_and_writes_its_files(commits, tmp_path):
    code, out, err = invoke("history", commits["c"], commits["a"], commits["b"], "--out", tmp_path / "h")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["1", "aaaaaaa", "2026-12-01T10:00:00+00:00", "first"]
    assert lines[1].startswith("  2  bbbbbbb  2026-12-02T10:00:00+01:00  regression vs aaaaaaa: "
                               "breastmnist prototype k=1 ACC")
    assert lines[2].startswith("  3  ccccccc  2026-12-03T10:00:00+00:00  improvement vs bbbbbbb: ")
    assert "3 commits; 1 with a regression" in out
    files = {p.name for p in (tmp_path / "h").iterdir()}
    assert files == {"history.csv", "history.md", "verdicts.csv", "history.png", "history.svg"}
    assert (tmp_path / "h" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "h" / "history.svg").read_text().lstrip().startswith("<?xml")
    verdicts = (tmp_path / "h" / "verdicts.csv").read_text().splitlines()
    assert [line.split(",")[7] for line in verdicts] == ["verdict", "first", "regression", "improvement"]
    # against one fixed baseline: the first commit itself
    code, out, err = invoke("history", commits["c"], commits["a"], commits["b"], "--out", tmp_path / "f",
                            "--baseline", commits["a"])
    assert code == 0, err
    assert [line.split()[3] for line in out.splitlines()[:3]] == ["pass", "regression", "pass"]


def test_the_report_has_a_history_section_with_several_commits_only(run, commits, tmp_path):
    # the run's own report: one commit, no section and no history files
    assert "History over commits" not in (run / "run" / "report.html").read_text()
    assert not (run / "run" / "history").exists()
    # another version's run of the same cells (other cell ids) beside it: two commits
    later = _write(tmp_path / "later", _as_commit(_records(commits["b"] / "results.jsonl"), "b", harness="0.1.0+b"))
    code, out, err = invoke("report", commits["a"], later, "--out", tmp_path / "rep")
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert '<h2 id="history">History over commits</h2>' in page and '<a href="#history">history</a>' in page
    # gated as `hica-bench history` gates: the later commit against the earlier one (the same cells, other origins)
    assert "The gate (hica-bench check): each commit against the one before it" in page and "<h3>ACC (%" in page
    assert "Not gated here" not in page
    assert "aaaaaaa" in page and "bbbbbbb" in page and '<img src="data:image/png;base64,' in page.split('id="history"')[1]
    assert {p.name for p in (tmp_path / "rep" / "history").iterdir()} == {
        "history.csv", "history.md", "verdicts.csv", "history.png", "history.svg"}


@pytest.mark.parametrize("case", ["one commit", "not results", "missing folder", "missing baseline", "bad tolerance"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, commits, tmp_path):
    args = [commits["a"], commits["b"]]
    expected = {"one commit": "history needs results of at least 2 commits; these hold 1 (aaaaaaa, 3 results)",
                "not results": "is not valid JSON", "missing folder": "is neither a results file nor a folder",
                "missing baseline": "baseline file", "bad tolerance": "--tolerance and --noise-z must be"}[case]
    if case == "one commit":
        args = [commits["a"], _write(tmp_path / "copy", _records(commits["a"] / "results.jsonl"))]
    elif case == "not results":
        (tmp_path / "notes.txt").write_text("not a results file\n")
        args.append(tmp_path / "notes.txt")
    elif case == "missing folder":
        args.append(tmp_path / "nope")
    elif case == "missing baseline":
        args += ["--baseline", tmp_path / "nope"]
    else:
        args += ["--tolerance", "-1"]
    code, out, err = invoke("history", *args, "--out", tmp_path / "out")
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
