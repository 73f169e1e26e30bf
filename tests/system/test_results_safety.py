"""Finished results are never lost (issue 31, class 1): a record the store writes always reads back, a cell that
fails after it was scored carries no metrics, and `merge` and `run` on one --out exclude each other; concurrent
merges are safe; a merge keeps the target's history and says what it drops and why. Real processes hold the locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, invoke, prototype_run
from hica_bench.results import ResultsStore

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


@pytest.fixture(scope="module")
def shards(medmnist_root, tmp_path_factory) -> Path:
    """Two shards of one grid (prototype, k=1, seeds 0-3) and their shared feature cache."""
    root = tmp_path_factory.mktemp("shards")
    for index in (0, 1):
        prototype_run(medmnist_root, root / "cache", root / "grid", "0,1,2,3", "--shard", f"{index}/2", "--no-report")
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """Another process holding ``folder``'s --out lock as ``command`` does, until it is killed."""
    script = textwrap.dedent(f"""
        import sys, time
        from hica_bench.results import out_lock
        with out_lock({str(folder)!r}, {command!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_fit_info_nested_100000_deep_is_recorded_and_every_command_reads_the_folder(medmnist_root, tmp_path):
    args = ["-p", "pixel_encoder", "-p", "result_hazards", "run", "--encoder", "pixels", "--datasets", "breastmnist",
            "--methods", "deep-fit-info,prototype", "--shots", "1", "--seeds", "0,1", "--data-root", medmnist_root,
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out"]
    code, out, err = invoke(*args)
    assert code == 0, err
    records = [json.loads(line) for line in _lines(tmp_path / "out" / "results.jsonl")]
    deep = [r for r in records if r["key"]["method"] == "deep-fit-info"]
    assert len(records) == 4 and all(r["status"] == "ok" and r["metrics"] for r in records)
    text = json.dumps(deep[0]["fit_info"])
    assert "nested deeper than" in text and text.count("{") < 100  # cut at the codec's depth, not 100,000 deep
    code, out, err = invoke(*args)  # resume reads the file: everything is finished
    assert code == 0 and "4 already finished" in " ".join(out.split()), err
    for command in (["leaderboard", tmp_path / "out"], ["report", tmp_path / "out", "--out", tmp_path / "report"],
                    ["check", "--baseline", tmp_path / "out", "--results", tmp_path / "out"]):
        code, out, err = invoke(*command)
        assert code == 0, (command, err)


def test_a_cell_that_fails_after_it_was_scored_carries_no_metrics(medmnist_root, tmp_path):
    code, out, err = invoke("-p", "pixel_encoder", "-p", "result_hazards", "run", "--no-report", "--encoder", "pixels",
                            "--datasets", "breastmnist", "--methods", "raising-fit-info", "--shots", "1", "--seeds", "0",
                            "--data-root", medmnist_root, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert code == 1, err
    (record,) = [json.loads(line) for line in _lines(tmp_path / "out" / "results.jsonl")]
    assert record["status"] == "failed" and "fit_info_ cannot be read" in record["reason"]
    assert record["metrics"] is None and record["per_class"] is None and record["calibration"] is None
    code, _, err = invoke("leaderboard", tmp_path / "out")  # the file reads back
    assert code == 0, err


def test_merge_is_refused_while_a_run_writes_to_the_folder(shards, tmp_path):
    target = shards / "grid" / "shard-0-of-2"
    before = (target / "results.jsonl").read_bytes()
    holder = _hold_lock(target, "run")
    try:
        code, out, err = invoke("merge", target, shards / "grid" / "shard-1-of-2", "--out", target, "--no-report")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    line = _one_line(err)
    assert f"another hica-bench run (pid {holder.pid}) is writing to" in line and "use another --out" in line
    assert (target / "results.jsonl").read_bytes() == before


def test_a_run_is_refused_while_a_merge_writes_to_the_folder(shards, medmnist_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out, "merge")
    try:
        code, _, err = invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist",
                              "--methods", "prototype", "--shots", "1", "--seeds", "0", "--data-root", medmnist_root,
                              "--cache-dir", shards / "cache", "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"another hica-bench merge (pid {holder.pid}) is writing to" in _one_line(err)
    assert not (out / "results.jsonl").exists()


def test_two_merges_at_once_into_one_fresh_folder_lose_nothing(shards, tmp_path):
    inputs = [shards / "grid" / "shard-0-of-2", shards / "grid" / "shard-1-of-2"]
    expected = set(ResultsStore(inputs[0] / "results.jsonl").load()) | set(ResultsStore(inputs[1] / "results.jsonl").load())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    exe = str(Path(sys.executable).parent / "hica-bench")
    for attempt in range(3):  # started together; whichever comes second is refused (lock, or a file not among its inputs)
        out = tmp_path / f"merged-{attempt}"
        merges = [subprocess.Popen([exe, "merge", *map(str, files), "--out", str(out), "--no-report"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for files in (inputs, inputs[::-1])]
        outcomes = [(m.wait(timeout=300), m.stderr.read()) for m in merges]
        codes = sorted(code for code, _ in outcomes)
        assert codes in ([0, 0], [0, 2]), outcomes
        for code, err in outcomes:
            if code == 2:
                assert "is writing to" in _one_line(err) or "is not among the files to merge" in _one_line(err)
        assert set(ResultsStore(out / "results.jsonl").load()) == expected


def test_a_merge_keeps_the_targets_history_and_says_what_it_drops(shards, medmnist_root, tmp_path):
    target = tmp_path / "target"
    prototype_run(medmnist_root, shards / "cache", target, "0,1", "--no-report")
    prototype_run(medmnist_root, shards / "cache", target, "0,1", "--no-report", "--force")  # a --force history
    before = (target / "results.jsonl").read_bytes()
    assert len(before.splitlines()) == 4 and len(ResultsStore(target / "results.jsonl").load()) == 2
    code, out, err = invoke("merge", target, shards / "grid" / "shard-0-of-2", shards / "grid" / "shard-1-of-2",
                            "--out", target, "--no-report")
    assert code == 0, err
    after = (target / "results.jsonl").read_bytes()
    assert after.startswith(before)  # only appended: both records of each re-run cell are still there
    text = " ".join(out.split())
    assert "4 cells (2 duplicate records dropped)" in text
    assert "dropped 2: the same outcome is recorded in another of the files (kept once)" in text
    assert "kept 2 earlier records of re-run cells" in text
    assert len(after.splitlines()) == 4 + 2 and len(ResultsStore(target / "results.jsonl").load()) == 4
