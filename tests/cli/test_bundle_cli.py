"""``hica-bench export`` and ``hica-bench import`` on a real run (the test pixel encoder on the real BreastMNIST, saved
predictions, a prompt file): the round trip, the merge into a folder holding another run, and bad input (one line,
exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, invoke, prototype_run
from hica_bench.results import SCHEMA_VERSION
from test_bundle import member, members, pack, with_manifest


@pytest.fixture(scope="module")
def base(tmp_path_factory, medmnist_root) -> Path:
    """``run``: prototype at 1 shot, seeds 0 and 1, on BreastMNIST with a prompt file, predictions saved; ``other``: seed
    2 without the prompt file (other cells); ``bundle.tar.gz``: ``run`` exported with a suite."""
    base = tmp_path_factory.mktemp("bundle")
    (base / "p.yaml").write_text("classnames: [benign tumour, malignant tumour]\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets",
                              f"breastmnist:prompts={base / 'p.yaml'}", "--methods", "prototype", "--shots", "1",
                              "--seeds", "0,1", "--data-root", medmnist_root, "--cache-dir", base / "cache",
                              "--out", base / "run", "--save-predictions", "--no-report", "-q")
    assert code == 0, err
    prototype_run(medmnist_root, base / "cache", base / "other", "2", "--save-predictions", "--no-report", "-q")
    (base / "paper.toml").write_text('datasets = ["breastmnist"]\nshots = [1]\nseeds = [0, 1]\n')
    code, out, err = invoke("export", base / "run", "--out", base / "bundle.tar.gz", "--suite", base / "paper.toml")
    assert code == 0, err
    assert "exported 2 cells, 2 saved predictions files, 1 prompt file, the suite" in out
    return base


def records(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["cell_id"])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(code: int, err: str, *phrases: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("hica-bench: error: "), err
    for phrase in phrases:
        assert phrase in err


def test_import_gives_back_the_run(base, tmp_path):
    code, out, err = invoke("import", base / "bundle.tar.gz", "--out", tmp_path / "copy", "--no-report")
    assert code == 0, err
    copy, run = tmp_path / "copy", base / "run"
    assert records(copy / "results.jsonl") == records(run / "results.jsonl")
    saved = sorted(p.name for p in (run / "predictions").iterdir())
    assert len(saved) == 2 and sorted(p.name for p in (copy / "predictions").iterdir()) == saved
    for name in saved:
        assert (copy / "predictions" / name).read_bytes() == (run / "predictions" / name).read_bytes()
    assert (copy / "leaderboard.csv").read_text() == (run / "leaderboard.csv").read_text()
    assert next((copy / "prompts").glob("*/p.yaml")).read_bytes() == (base / "p.yaml").read_bytes()
    assert (copy / "suite" / "paper.toml").read_bytes() == (base / "paper.toml").read_bytes()
    assert "imported" in out and "2 cells" in out and f"written: {copy / 'results.jsonl'}" in out
    assert not (copy / "report.html").exists()


def test_two_exports_of_the_same_results_are_byte_identical(base, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for name in ("a.tar.gz", "b.tar.gz"):
        code, _, err = invoke("export", base / "run" / "results.jsonl", "--out", tmp_path / name)
        assert code == 0, err
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


def test_import_into_a_folder_holding_another_run_merges_and_publishes(base, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(base / "other", folder)
    before = (folder / "results.jsonl").read_bytes()
    code, out, err = invoke("import", base / "bundle.tar.gz", "--out", folder)
    assert code == 0, err
    merged = records(folder / "results.jsonl")
    assert sorted(r["key"]["seed"] for r in merged) == [0, 1, 2]
    assert (folder / "results.jsonl").read_bytes().startswith(before)
    assert all((folder / r["predictions"]).is_file() for r in merged)
    board = (folder / "leaderboard.csv").read_text()
    assert "prompts=" in board and "breastmnist," in board  # both runs' datasets
    assert (folder / "report.html").is_file() and f"report: {folder / 'report.html'}" in out
    code, out, err = invoke("import", base / "bundle.tar.gz", "--out", folder, "--no-report")  # again: nothing new
    assert code == 0, err
    assert len(records(folder / "results.jsonl")) == 3 and "dropped 2: the same outcome" in out


def _wrong_digest(entries):
    info, data = entries[-1]
    entries[-1] = (info, data[:-1] + bytes([data[-1] ^ 1]))
    return entries


BAD = {
    "wrong digest": (_wrong_digest, "does not match its sha256"),
    "dot dot": (lambda e: with_manifest(e + [(member("../x"), b"escape")]), "'../x'"),
    "symlink": (lambda e: e[:2] + [(member("predictions/x.npz", tarfile.SYMTYPE, "/etc/passwd"), b"")] + e[2:],
                "symbolic link"),
    "newer schema": (lambda e: with_manifest(e, lambda m: m.update(schema_version=SCHEMA_VERSION + 1)),
                     "made by a newer hica-bench"),
}


@pytest.mark.parametrize("into", ["new folder", "folder holding a run"])
@pytest.mark.parametrize("case", [*BAD, "truncated"])
def test_a_bad_bundle_is_one_line_and_writes_nothing(base, tmp_path, case, into):
    bad = tmp_path / "bad.tar.gz"
    if case == "truncated":
        data = (base / "bundle.tar.gz").read_bytes()
        bad.write_bytes(data[:len(data) // 2])
        phrase = "truncated or damaged"
    else:
        edit, phrase = BAD[case]
        pack(bad, edit(members(base / "bundle.tar.gz")))
    out = tmp_path / "out"
    if into == "folder holding a run":
        shutil.copytree(base / "other", out)
    before = snapshot(out) if out.exists() else None
    code, _, err = invoke("import", bad, "--out", out)
    one_line_error(code, err, f"bundle {bad}", phrase, "nothing written")
    assert (snapshot(out) if out.exists() else None) == before
    assert not (tmp_path / "x").exists()


def test_import_refuses_another_outcome_for_a_cell_and_leaves_the_folder_as_it_was(base, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(base / "run", changed)
    lines = (changed / "results.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["metrics"]["acc"] = 1 - record["metrics"]["acc"] if record["metrics"]["acc"] != 0.5 else 0.25
    (changed / "results.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    code, _, err = invoke("export", changed, "--out", tmp_path / "changed.tar.gz")
    assert code == 0, err
    folder = tmp_path / "folder"
    shutil.copytree(base / "run", folder)
    before = snapshot(folder)
    code, _, err = invoke("import", tmp_path / "changed.tar.gz", "--out", folder, "--no-report")
    one_line_error(code, err, "has different results in", "changed.tar.gz")
    assert {k: v for k, v in snapshot(folder).items() if k != ".hica-bench.lock"} == \
        {k: v for k, v in before.items() if k != ".hica-bench.lock"}


def test_export_refuses_a_missing_predictions_file(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    next((run / "predictions").iterdir()).unlink()
    code, _, err = invoke("export", run, "--out", tmp_path / "b.tar.gz")
    one_line_error(code, err, "saved predictions", "no such file")
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.parametrize("args, phrase", [
    (["--suite", "paper.yaml"], "suite"),  # a suite that does not read as one
    ([], "neither a results file nor a folder"),
])
def test_export_bad_input(base, tmp_path, args, phrase):
    (tmp_path / "paper.yaml").write_text("shotz: [1]\n")
    results = base / "run" if args else tmp_path / "nowhere"
    code, _, err = invoke("export", results, "--out", tmp_path / "b.tar.gz",
                          *[tmp_path / a if a.endswith(".yaml") else a for a in args])
    one_line_error(code, err, phrase)
    assert not (tmp_path / "b.tar.gz").exists()


def test_a_missing_bundle_is_one_line(tmp_path):
    code, _, err = invoke("import", tmp_path / "none.tar.gz", "--out", tmp_path / "out")
    one_line_error(code, err, "no such file")
    assert not (tmp_path / "out").exists()
