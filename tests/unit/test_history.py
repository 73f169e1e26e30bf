"""``hica_bench.history`` on real run records: a subset of the committed default leaderboard's results (BreastMNIST,
linear-probe and prototype, 5 shots, all ten seeds) copied as four "commits", one with linear-probe's accuracy lowered
by 5 points (a regression the gate must catch) and one with a faster harness; and the schema 11 field it orders by."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import statistics
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from hica_bench import check, history
from hica_bench.errors import UserError
from hica_bench.results import SCHEMA_VERSION, CellResult, Environment, ResultsStore

REPO = Path(__file__).resolve().parents[2]
BOARD = REPO / "leaderboards" / "default" / "results.jsonl"
METHODS = ("linear-probe", "prototype")
#: commit -> (git_time, ACC change of linear-probe, paired efficiency factor); the times' text order is not their order
#: in time (c2 is at 07:00 UTC, c3 at 08:00 UTC), and the folders are given in another order again
COMMITS = {"c1": ("2026-12-01T10:00:00+00:00", 0.0, 1.0),
           "c2": ("2026-12-02T12:00:00+05:00", 0.0, 1.6),
           "c3": ("2026-12-02T08:00:00+00:00", -0.05, 1.0),
           "c4": ("2026-12-03T09:00:00-03:00", 0.0, 1.0)}
FOLDERS = ("c3", "c1", "c4", "c2")


def _hash(name: str) -> str:
    return (name[1] * 40)


def gate(baseline: Path | None = None, tolerance: float = check.DEFAULT_TOLERANCE) -> history.Gate:
    """The gate as `hica-bench history` hands it over: hica_bench.check with its default tolerances."""
    settings = {"tolerance": tolerance, "noise_z": 0.0, "throughput_tolerance": check.DEFAULT_THROUGHPUT_TOLERANCE}
    return history.Gate(check.load, functools.partial(check.compare, **settings), settings, baseline)


@pytest.fixture(scope="module")
def board_records() -> list[dict]:
    """The subset's raw records (schema 5) and 20 clean-or-corrupted records of schema 7 from the board."""
    chosen, later = [], []
    with BOARD.open() as handle:
        for line in handle:
            if '"breastmnist"' not in line:
                continue
            record = json.loads(line)
            key = record["key"]
            if (key["method"] in METHODS and key["k"] == 5 and key.get("corruption") is None
                    and record["status"] == "ok"):
                chosen.append(record)
            elif record["schema_version"] == 7 and len(later) < 20:
                later.append(record)
    assert len(chosen) == 20 and {r["key"]["seed"] for r in chosen} == set(range(10))
    return chosen + later


@pytest.fixture(scope="module")
def subset(board_records) -> list[CellResult]:
    return [CellResult.from_record(r) for r in board_records[:20]]


def _commit(results: list[CellResult], name: str, git_time: str | None = None, acc: float = 0.0,
            efficiency: float = 1.0) -> list[CellResult]:
    out = []
    for r in results:
        metrics = r.metrics
        if acc and r.key.method == "linear-probe":
            metrics = dataclasses.replace(metrics, acc=metrics.acc + acc)
        paired = r.timings.paired_efficiency
        timings = dataclasses.replace(r.timings, paired_efficiency=None if paired is None else paired * efficiency)
        environment = dataclasses.replace(r.environment, git=_hash(name), git_time=git_time)
        out.append(dataclasses.replace(r, metrics=metrics, timings=timings, environment=environment,
                                       schema_version=SCHEMA_VERSION))
    return out


def _write(folder: Path, results: list[CellResult]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(r.to_json() + "\n" for r in results))
    return folder


@pytest.fixture(scope="module")
def folders(subset, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("commits")
    return [_write(root / name, _commit(subset, name, COMMITS[name][0], COMMITS[name][1], COMMITS[name][2]))
            for name in FOLDERS]


@pytest.fixture(scope="module")
def written(folders, tmp_path_factory):
    found = history.build(history.read(folders), gate())
    out = tmp_path_factory.mktemp("history")
    return found, history.write(found, out), out


def test_a_cell_is_the_gates_cell():
    assert set(history.CELL) == set(check.CELL)


def test_commits_are_ordered_by_commit_time_not_by_folder_or_text_order(written):
    found, _, out = written
    assert [c.id for c in found.commits] == [_hash(n) for n in ("c1", "c2", "c3", "c4")]
    assert [c.label for c in found.commits] == ["1111111", "2222222", "3333333", "4444444"]
    assert not found.notes  # every commit has its time: nothing to say about the order
    rows = list(csv.DictReader((out / "verdicts.csv").open()))
    assert [r["label"] for r in rows] == ["1111111", "2222222", "3333333", "4444444"]
    assert {r["time_source"] for r in rows} == {"commit"}


def test_table_values_are_the_means_over_seeds_with_their_t_interval(written, folders):
    found, _, out = written
    rows = list(csv.DictReader((out / "history.csv").open()))
    checked = 0
    for folder in folders:
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        commit = records[0]["environment"]["git"]
        for method in METHODS:
            for metric in history.METRICS:
                values = [r["metrics"][metric] for r in records if r["key"]["method"] == method]
                (row,) = [r for r in rows if r["commit"] == commit and r["method"] == method and r["metric"] == metric]
                mean = statistics.mean(values)
                low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=scipy_stats.sem(values))
                assert float(row["value"]) == pytest.approx(mean, rel=1e-5)
                assert float(row["ci_low"]) == pytest.approx(low, rel=1e-5)
                assert float(row["ci_high"]) == pytest.approx(high, rel=1e-5)
                assert row["n"] == "10" and row["k"] == "5" and row["dataset"] == "breastmnist"
                assert row["commit_time"] == COMMITS[folder.name][0] and row["statistic"] == "mean"
                checked += 1
        paired = [r["timings"]["paired_efficiency"] for r in records]
        (row,) = [r for r in rows if r["commit"] == commit and r["metric"] == history.EFFICIENCY]
        assert float(row["value"]) == pytest.approx(float(np.median(paired)), rel=1e-5) and row["method"] == ""
    assert checked == 4 * 2 * 5
    # the in-memory table holds the same, unrounded
    acc = found.table[(found.table["metric"] == "acc") & (found.table["method"] == "linear-probe")]
    assert list(acc["value"].round(6)) == pytest.approx([0.639744, 0.639744, 0.589744, 0.639744], abs=1e-6)


def test_the_gate_marks_the_regression_and_the_improvements(written):
    found, _, out = written
    assert [v.verdict for v in found.verdicts] == ["first", "improvement", "regression", "improvement"]
    assert [v.against for v in found.verdicts] == [None, "1111111", "2222222", "3333333"]
    regression = found.verdicts[2]
    assert regression.regressed == ["breastmnist linear-probe k=5 ACC 64.0 → 59.0 (-5.0 points)"]
    assert regression.compared == 2 and not regression.improved
    assert found.verdicts[1].improved == ["breastmnist (effnet-lite0-minilm) throughput 3.130 → 5.008 (+60.0%)"]
    assert found.verdicts[3].improved == ["breastmnist linear-probe k=5 ACC 59.0 → 64.0 (+5.0 points)"]
    rows = list(csv.DictReader((out / "verdicts.csv").open()))
    assert [r["verdict"] for r in rows] == ["first", "improvement", "regression", "improvement"]
    assert "ACC 64.0 → 59.0" in rows[2]["regressed"] and rows[2]["against"] == "2222222"
    page = (out / "history.md").read_text()
    assert "| gate verdict | — | improvement | regression | improvement |" in page
    assert "| breastmnist · linear-probe · k=5 | 64.0 ± 6.4 (10) | 64.0 ± 6.4 (10) | 59.0 ± 6.4 (10) | 64.0 ± 6.4 (10) |" \
        in page
    assert "| breastmnist · effnet-lite0-minilm | 3.130 | 5.008 | 3.130 | 3.130 |" in page
    for metric in ("ACC", "AUC", "F1 macro", "balanced accuracy", "ECE"):
        assert f"## {metric} (%" in page


def test_a_fixed_baseline_gates_every_commit_against_it(folders):
    baseline = next(f for f in folders if f.name == "c1")
    found = history.build(history.read(folders), gate(baseline))
    assert [v.verdict for v in found.verdicts] == ["pass", "improvement", "regression", "pass"]
    assert {v.against for v in found.verdicts} == {str(baseline)}
    # a looser tolerance lets the 5-point drop pass
    loose = history.build(history.read(folders), gate(baseline, tolerance=6.0))
    assert loose.verdicts[2].verdict == "pass"


def test_the_figure_is_a_valid_png_and_svg(written):
    from matplotlib import image

    _, files, out = written
    assert set(files) == {"history.csv", "history.md", "verdicts.csv", "history.png", "history.svg"}
    png = out / "history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    root = ET.parse(out / "history.svg").getroot()
    assert root.tag.endswith("svg")
    text = (out / "history.svg").read_text()
    assert text.count("<!-- 3333333 -->") == 6  # each of the six panels labels its x axis with the short hashes


def test_without_commit_times_the_order_is_the_first_results_and_a_note_says_so(subset, tmp_path):
    old = [_commit(subset, "c1"), _commit(subset, "c2", acc=-0.05)]
    for results, day in zip(old, ("2026-12-05", "2026-12-01")):  # c2's run finished first
        for r in results:
            r.finished_at = f"{day}T10:00:00+00:00"
    found = history.build(old[0] + old[1], gate())
    assert [c.label for c in found.commits] == ["2222222", "1111111"]
    assert any("ordered by their earliest result's finished_at" in note for note in found.notes)
    assert [v.verdict for v in found.verdicts] == ["first", "improvement"]  # c1 gated against c2: +5 points
    assert history.commit_rows(found)[0]["time_source"] == "first result"


def test_results_without_a_commit_are_grouped_by_version(subset):
    named = _commit(subset, "c1", COMMITS["c1"][0])
    anonymous = [dataclasses.replace(r, environment=dataclasses.replace(r.environment, git=None, git_time=None))
                 for r in subset]
    found = history.build(named + anonymous, gate())
    assert {c.label for c in found.commits} == {"1111111", "v0.1.0"}
    assert any("name no commit" in note and "v0.1.0" in note for note in found.notes)


def test_an_unmeasured_efficiency_is_none_and_said_so(subset, tmp_path):
    first = _commit(subset, "c1", COMMITS["c1"][0])
    second = _commit(subset, "c2", COMMITS["c2"][0], efficiency=1.0)
    for r in second:
        r.timings.paired_efficiency = None
    found = history.build(first + second)
    efficiency = found.table[found.table["metric"] == history.EFFICIENCY]
    assert efficiency["value"].isna().tolist() == [False, True]
    assert "| breastmnist · effnet-lite0-minilm | 3.130 | not measured |" in history.markdown(found)


def test_without_a_gate_the_tables_have_no_verdicts(folders):
    """What the report does (it may not import the gate): the same tables, no verdicts and no markers."""
    found = history.build(history.read(folders))
    assert [v.verdict for v in found.verdicts] == [history.NOT_GATED] * 4 and found.gate is None
    page = history.markdown(found)
    assert "gate verdict" not in page and "Not gated here" in page
    assert "| breastmnist · linear-probe · k=5 | 64.0 ± 6.4 (10) | 64.0 ± 6.4 (10) | 59.0 ± 6.4 (10) | 64.0 ± 6.4 (10) |" \
        in page
    assert history.figure(found) is not None


def test_one_commit_is_refused(subset, folders):
    with pytest.raises(UserError, match=r"needs results of at least 2 commits; these hold 1 \(1111111, 20 results\)"):
        history.build(_commit(subset, "c1", COMMITS["c1"][0]))
    with pytest.raises(UserError, match="holds no results"):
        empty = folders[0].parent / "empty"
        empty.mkdir(exist_ok=True)
        (empty / "results.jsonl").write_text("")
        history.read([folders[0], empty])
    assert history.several_commits(_commit(subset, "c1") + _commit(subset, "c2"))
    assert not history.several_commits(_commit(subset, "c1"))


# --------------------------------------------------------------------------- schema 11: the commit's time


def test_a_schema_10_record_reads_with_no_commit_time_and_the_same_cell_id(subset, tmp_path):
    record = json.loads(_commit(subset[:1], "c1", COMMITS["c1"][0])[0].to_json())
    assert record["schema_version"] == SCHEMA_VERSION == 11 and record["environment"]["git_time"]
    del record["environment"]["git_time"]
    record["schema_version"] = 10
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (loaded,) = ResultsStore(path).load().values()
    assert loaded.environment.git_time is None and loaded.environment.git == _hash("c1")
    assert loaded.cell_id == subset[0].cell_id == record["cell_id"] and loaded.schema_version == 10
    record["schema_version"] = 11  # the same record claiming schema 11 lacks the field
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="missing field environment.git_time"):
        ResultsStore(path).load()


def test_the_boards_records_keep_their_cell_ids(board_records):
    """The environment is no part of the identity: records of schemas 5 and 7 read back (and written as schema 11)
    with the cell ids they were written with."""
    assert {r["schema_version"] for r in board_records} == {5, 7}
    for record in board_records:
        result = CellResult.from_record(record)
        assert result.cell_id == record["cell_id"] and result.origin_id == record["origin_id"]
        assert result.environment.git_time is None
        again = json.loads(dataclasses.replace(result, environment=dataclasses.replace(
            result.environment, git_time="2026-12-01T10:00:00+00:00"), schema_version=SCHEMA_VERSION).to_json())
        assert again["cell_id"] == record["cell_id"]


def test_the_environment_records_the_commit_time_in_a_git_checkout():
    from hica_bench.environment import environment

    git = subprocess.run(["git", "show", "-s", "--format=%H %cI", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout")
    found = environment("cpu")
    assert isinstance(found, Environment)
    assert f"{found.git} {found.git_time}" == git.stdout.strip()
