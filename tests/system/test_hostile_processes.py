"""Hostile conditions that need real processes (issue 13): full disks (a real tmpfs, mounted in a user and mount
namespace of the test's own), SIGINT and SIGTERM, a reader that closes the pipe, and two runs on one ``--out``.

Each keeps the README's promise: one line on stderr, the documented exit code, and nothing finished lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_reliability import CELLS, ENV, GRID, Run, comparable, grid_run, records
from test_reliability import reference, warm  # noqa: F401  (fixtures: the warm fork server, an uninterrupted run)

pytestmark = pytest.mark.slow
HICA_BENCH = str(Path(sys.executable).parent / "hica-bench")


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- signals


def wait_for_records(root: Path, run: Run, count: int) -> None:
    deadline = time.monotonic() + 240
    while len(records(root)) < count:
        assert run.alive(), f"the run ended before it could be stopped: {run.finish()}"
        assert time.monotonic() < deadline, "no records appended"
        time.sleep(0.02)


def test_a_signal_in_the_middle_of_fit_is_the_same_one_line(medmnist_root, tmp_path, warm):
    grid = ["-p", "pixel_encoder", "-p", "misbehaving_methods", "run", "--encoder", "pixels", "--datasets", "breastmnist",
            "--methods", "prototype,hangs:seconds=30", "--shots", "1", "--seeds", "0", "--data-root", str(medmnist_root),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--quiet"]
    run = Run(grid, {}, tmp_path, warm)
    wait_for_records(tmp_path, run, 1)  # prototype finished; the next cell sleeps in fit
    time.sleep(0.5)
    os.kill(run.pid, signal.SIGTERM)
    code, _, err = run.finish()
    assert code == 143 and one_line(err).startswith("hica-bench: interrupted by SIGTERM")
    assert [r["key"]["method"] for r in records(tmp_path)] == ["prototype"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_with_one_line_and_resume_loses_nothing(reference, medmnist_root, tmp_path, warm,
                                                                       signum, code):
    run = grid_run(tmp_path, medmnist_root, "-p", "crash_points", env={"HICA_TEST_SLOW_RESULTS": "0.3"}, server=warm)
    wait_for_records(tmp_path, run, 3)
    os.kill(run.pid, signum)
    got, _, err = run.finish()
    assert got == code, err
    name = signal.Signals(signum).name
    assert one_line(err) == (f"hica-bench: interrupted by {name}; finished cells are kept in the results file "
                             "(rerun the same command to resume)")
    kept = records(tmp_path)
    assert 3 <= len(kept) < CELLS and (tmp_path / "out" / "results.jsonl").read_text().endswith("\n")

    got, out, err = grid_run(tmp_path, medmnist_root, server=warm).finish()
    assert got == 0, err
    assert f"{len(kept)} already finished" in " ".join(out.split())
    final = records(tmp_path)
    assert [comparable(r) for r in final] == [comparable(r) for r in records(reference)]  # every cell once, same numbers


# --------------------------------------------------------------------------- a reader that goes away


def test_a_closed_stdout_changes_nothing_but_what_is_printed(medmnist_root, tmp_path):
    """`hica-bench list | head -0`, a run whose log reader died, a gate whose output nobody reads: each finishes its
    work quietly and exits with its own code (not typer's 1 for a broken pipe, which means "cells failed")."""
    def closed(*args: str) -> tuple[int, bytes]:
        process = subprocess.Popen([HICA_BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        process.stdout.close()
        return process.wait(timeout=300), process.stderr.read()

    assert closed("list") == (0, b"")
    assert closed("-p", "pixel_encoder", "run", *GRID, "--data-root", str(medmnist_root), "--cache-dir",
                  str(tmp_path / "cache"), "--out", str(tmp_path / "out")) == (0, b"")
    assert len(records(tmp_path)) == CELLS and (tmp_path / "out" / "leaderboard.md").exists()
    results = tmp_path / "out" / "results.jsonl"
    better = tmp_path / "better.jsonl"  # a baseline 5 points better: the gate must still say 1, and write its report
    better.write_text("".join(json.dumps({**r, "metrics": {**r["metrics"], "acc": r["metrics"]["acc"] + 0.05}}) + "\n"
                              for r in map(json.loads, results.read_text().splitlines())))
    assert closed("check", "--baseline", str(better), "--results", str(results), "--report",
                  str(tmp_path / "report.json")) == (1, b"")
    assert json.loads((tmp_path / "report.json").read_text())


# --------------------------------------------------------------------------- two runs on one folder


def test_two_runs_on_one_out_folder_record_every_cell_once(medmnist_root, tmp_path, warm):
    """Three runs of the installed command started together: two on one --out (one is refused with one line), and a
    third on its own --out sharing the cache, which waits for the features the first computes instead of computing
    them again."""
    slow = {"HICA_TEST_SLOW_RESULTS": "0.3"}  # each run takes long enough for the others to start meanwhile
    first = grid_run(tmp_path, medmnist_root, "-p", "crash_points", env=slow)
    second = grid_run(tmp_path, medmnist_root, "-p", "crash_points", env=slow)
    other = Run(["-p", "pixel_encoder", "run", *GRID, "--data-root", str(medmnist_root), "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "other")], {}, tmp_path, None)
    (code_a, out_a, err_a), (code_b, out_b, err_b), (code_c, out_c, err_c) = first.finish(), second.finish(), other.finish()
    outcomes = sorted([(code_a, err_a, out_a), (code_b, err_b, out_b)])
    assert outcomes[0][0] == 0 and code_c == 0, (outcomes, err_c)
    assert outcomes[1][0] == 2 and "is writing to" in one_line(outcomes[1][1]) and "use another --out" in outcomes[1][1]
    assert len(records(tmp_path)) == CELLS  # every cell exactly once (records() refuses a cell recorded twice)
    misses = [int(out.split("feature cache: ")[1].split(" hits, ")[1].split(" misses")[0]) for out in (outcomes[0][2], out_c)]
    assert sum(misses) == 2, misses  # train and test features computed once between the two runs sharing the cache
    code, out, err = grid_run(tmp_path, medmnist_root, server=warm).finish()
    assert code == 0 and f"{CELLS} already finished" in out and len(records(tmp_path)) == CELLS


# --------------------------------------------------------------------------- full disks


def _namespaces_work() -> str | None:
    if not shutil.which("unshare"):
        return "util-linux unshare is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}"


_WHY_NOT = _namespaces_work()
FULL_DISK = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def on_a_full_disk(tmp_path: Path, prepare: str, command: list[str]) -> tuple[int, str, Path]:
    """Mount a 512 KiB tmpfs at ``tmp_path/fs`` (in a namespace of this test's own), run ``prepare`` (shell), fill the
    disk, run ``hica-bench COMMAND``, and copy what is on the disk to ``tmp_path/after``: (exit code, stderr, after)."""
    fs, after = tmp_path / "fs", tmp_path / "after"
    fs.mkdir()
    args = " ".join(f"'{a}'" for a in [HICA_BENCH, *command])
    script = f"""
        set -e
        mount -t tmpfs -o size=512k tmpfs '{fs}'
        {prepare}
        dd if=/dev/zero of='{fs}/filler' bs=1k 2>/dev/null || true
        set +e
        {args} > '{tmp_path}/stdout' 2> '{tmp_path}/stderr'
        echo $? > '{tmp_path}/code'
        rm -f '{fs}/filler'
        cp -a '{fs}' '{after}'
    """
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int((tmp_path / "code").read_text()), (tmp_path / "stderr").read_text(), after


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name)


@FULL_DISK
def test_a_full_disk_under_the_results_keeps_every_finished_record(reference, medmnist_root, tmp_path):
    good = reference / "out"
    grid = [a if a != "1,3" else "1,3,5" for a in GRID]  # the 5-shot cells are pending
    code, err, after = on_a_full_disk(tmp_path, f"cp -a '{good}' '{tmp_path}/fs/out'", [
        "-p", "pixel_encoder", "run", *grid, "--data-root", str(medmnist_root), "--cache-dir", str(reference / "cache"),
        "--out", str(tmp_path / "fs" / "out")])
    assert code == 2
    assert one_line(err) == f"hica-bench: error: cannot write {tmp_path}/fs/out/results.jsonl: No space left on device"
    for name in ("leaderboard.md", "leaderboard.csv"):  # byte for byte the good files
        assert (after / "out" / name).read_bytes() == (good / name).read_bytes(), name
    # The good records are kept byte for byte. A record may still fit in the slack of the file's last page on a full
    # tmpfs; whatever follows them is whole 5-shot records, never a torn line.
    kept, before = (after / "out" / "results.jsonl").read_bytes(), (good / "results.jsonl").read_bytes()
    assert kept.startswith(before)
    extra = kept[len(before):]
    assert extra == b"" or extra.endswith(b"\n")
    assert all(json.loads(line)["key"]["k"] == 5 and json.loads(line)["status"] == "ok" for line in extra.splitlines())
    assert leftovers(after) == []


@FULL_DISK
def test_a_full_disk_under_the_leaderboard_keeps_the_previous_one(reference, tmp_path):
    good = reference / "out"
    code, err, after = on_a_full_disk(tmp_path, f"mkdir '{tmp_path}/fs/board' && cp '{good}/leaderboard.md' '{tmp_path}/fs/board/'", [
        "leaderboard", str(good / "results.jsonl"), "--out", str(tmp_path / "fs" / "board")])
    assert code == 2
    assert one_line(err) == f"hica-bench: error: cannot write {tmp_path}/fs/board/leaderboard.md: No space left on device"
    assert (after / "board" / "leaderboard.md").read_bytes() == (good / "leaderboard.md").read_bytes()
    assert sorted(p.name for p in (after / "board").iterdir()) == ["leaderboard.md"]  # no torn or temporary file


@FULL_DISK
def test_a_full_disk_under_the_cache_leaves_no_torn_entry(medmnist_root, tmp_path):
    code, err, after = on_a_full_disk(tmp_path, f"mkdir '{tmp_path}/fs/cache'", [
        "-p", "pixel_encoder", "run", *GRID, "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "fs" / "cache"),
        "--out", str(tmp_path / "out")])
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"hica-bench: error: cannot write {tmp_path}/fs/cache/") and line.endswith("No space left on device")
    features = after / "cache" / "features"
    names = sorted(p.name for p in features.iterdir()) if features.exists() else []
    assert all(n[:-4] + ".json" in names for n in names if n.endswith(".npy")), names  # no array without its entry
    assert leftovers(after) == [] and not (tmp_path / "out" / "results.jsonl").exists()


@FULL_DISK
def test_a_read_only_results_file_is_refused_before_any_work(reference, medmnist_root):
    """Run as an unprivileged user (a user namespace without a mapping: uid nobody), since root may write anyway; in a
    folder of its own that nobody may enter (pytest's are private to their owner)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="hica-bench-read-only-"))
    out = tmp_path / "out"
    shutil.copytree(reference / "out", out)
    for folder in (tmp_path, out):
        folder.chmod(0o777)
    (out / "results.jsonl").chmod(0o444)
    before = (out / "results.jsonl").read_bytes()
    grid = [a if a != "1,3" else "1,3,5" for a in GRID]
    done = subprocess.run(["unshare", "--user", HICA_BENCH, "-p", "pixel_encoder", "run", *grid, "--data-root",
                           str(medmnist_root), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == f"hica-bench: error: cannot write {out}/results.jsonl: it is read-only"
    assert (out / "results.jsonl").read_bytes() == before and not (tmp_path / "cache" / "features").exists()
    shutil.rmtree(tmp_path)
