"""Scaling out: ``--executor ray`` on a real local Ray runtime (started in this process with ``ray.init``, by the CLI,
and as a separate ``ray start --head`` joined with ``--ray-address``), a worker killed mid-cell, and ``--shard I/N``
with ``hica-bench merge``. Every run is on the real BreastMNIST with the test pixel encoder; the in-process executor's
results are the reference the others must equal cell for cell."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, hica_bench, invoke

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hica-bench[ray]')")

#: two protocols: the plain one, and one whose cells need the val split's features (in a Ray worker too)
GRID = ["--encoder", "pixels", "--datasets", "breastmnist", "--methods", "linear-probe,prototype,knn",
        "--protocols", "few-shot,few-shot-val", "--shots", "1,5", "--seeds", "0,1", "--no-report", "-q"]
#: What a cell computed; its timings and the machine that ran it may differ between executors.
COMPUTED = ("status", "metrics", "per_class", "n_support", "n_test", "fit_info", "identity")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def computed(path: Path) -> dict[str, dict]:
    return {r["cell_id"]: {name: r[name] for name in COMPUTED} for r in records(path)}


def run_in_process(medmnist_root: Path, cache: Path, out: Path, *extra) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        return invoke("-p", "pixel_encoder", "run", *GRID, "--data-root", medmnist_root, "--cache-dir", cache,
                      "--out", out, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, medmnist_root) -> tuple[Path, dict[str, dict]]:
    """The grid with the in-process executor (and the feature cache the other runs share)."""
    base = tmp_path_factory.mktemp("executors")
    code, _, err = run_in_process(medmnist_root, base / "cache", base / "in-process")
    assert code == 0, err
    return base, computed(base / "in-process" / "results.jsonl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_started_in_this_process_gives_the_in_process_numbers(reference, medmnist_root, tmp_path):
    """``ray.init(num_cpus=2)`` here; the run uses that runtime, its cells run in Ray worker processes."""
    base, expected = reference
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        code, out, err = run_in_process(medmnist_root, base / "cache", tmp_path / "ray", "--executor", "ray",
                                        "--save-predictions")
        assert ray.is_initialized()  # a runtime the caller started is left running
        with pytest.MonkeyPatch.context() as patch:  # a method asking for more than any node has: one line, no wait
            patch.syspath_prepend(str(TEST_PLUGINS))
            greedy = invoke("-p", "slow_methods", "-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets",
                            "breastmnist", "--methods", "sleepy:cpus=64", "--shots", "1", "--seeds", "0",
                            "--data-root", medmnist_root, "--cache-dir", base / "cache", "--out", tmp_path / "greedy",
                            "--executor", "ray", "-q")
    finally:
        ray.shutdown()
    assert code == 0, err
    assert "executor: ray (cluster already joined: 2 CPUs" in " ".join(out.split())
    assert computed(tmp_path / "ray" / "results.jsonl") == expected
    found = records(tmp_path / "ray" / "results.jsonl")
    assert all((tmp_path / "ray" / r["predictions"]).is_file() for r in found)  # written by the driver
    assert {r["environment"]["torch_threads"] for r in found} == {None}  # recorded by the workers (no torch there)
    code, _, err = greedy
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "asks for 64 CPUs and 0 GPUs per cell; the largest node of the Ray cluster has 2" in err


@pytest.mark.slow
def test_a_cluster_started_with_ray_start_joined_by_address(reference, medmnist_root, tmp_path):
    base, expected = reference
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                              "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        done = hica_bench("-p", "pixel_encoder", "run", *GRID, "--data-root", str(medmnist_root), "--cache-dir",
                          str(base / "cache"), "--out", str(tmp_path / "cluster"), "--executor", "ray",
                          "--ray-address", f"127.0.0.1:{port}")
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"executor: ray (cluster 127.0.0.1:{port}: 2 CPUs" in " ".join(done.stdout.split())
    assert computed(tmp_path / "cluster" / "results.jsonl") == expected


@pytest.mark.slow
def test_a_worker_killed_mid_cell_fails_that_cell_and_a_rerun_completes_it(medmnist_root, reference, tmp_path):
    """SIGKILL the Ray worker fitting one cell: that cell is recorded failed (the grid goes on); the rerun runs it
    and every cell is in the results once."""
    base, _ = reference
    pids = tmp_path / "pids"
    command = ["-p", "slow_methods", "-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist",
               "--methods", f"sleepy:seconds=2.5:pid_dir={pids},prototype", "--shots", "1", "--seeds", "0,1,2",
               "--data-root", str(medmnist_root), "--cache-dir", str(base / "cache"), "--out", str(tmp_path / "out"),
               "--executor", "ray", "--workers", "2", "--no-report", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([str(Path(sys.executable).with_name("hica-bench")), *command], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (pids.is_dir() and any(pids.iterdir())) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    victim = sorted(pids.iterdir())[0]
    os.kill(int(victim.read_text()), signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-2000:]  # a failed cell: exit 1, every other cell finished
    first = records(tmp_path / "out" / "results.jsonl")
    failed = [r for r in first if r["status"] == "failed"]
    assert len(first) == 6 and len(failed) == 1, [r["reason"] for r in failed]
    assert "the Ray worker running it died" in failed[0]["reason"]
    assert failed[0]["key"]["method"].startswith("sleepy") and f"s{failed[0]['key']['seed']}" in victim.name
    shutil.rmtree(pids)
    again = hica_bench(*command, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "5 already finished, 1 ran ok" in " ".join(again.stdout.split())
    final = records(tmp_path / "out" / "results.jsonl")
    assert len(final) == 7 and final[:6] == first  # appended, nothing rewritten
    newest = {}
    for r in final:
        newest[r["cell_id"]] = r
    assert len(newest) == 6 and {r["status"] for r in newest.values()} == {"ok"}  # every cell once, finished


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="known flaky: Ray's core sometimes aborts with a C++ stack dump when SIGTERM "
                   "lands during one of its callbacks (2 of 7 runs); open, see the closing note")
def test_sigterm_during_a_ray_run_is_one_line_and_keeps_finished_cells(medmnist_root, reference, tmp_path):
    """Ray installs a crash handler for SIGTERM of its own; the run keeps the CLI's: exit 143, one line, finished
    cells kept (the local runtime it started is shut down)."""
    base, _ = reference
    command = ["-p", "slow_methods", "-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist",
               "--methods", "sleepy:seconds=1", "--shots", "1", "--seeds", ",".join(map(str, range(6))),
               "--data-root", str(medmnist_root), "--cache-dir", str(base / "cache"), "--out", str(tmp_path / "out"),
               "--executor", "ray", "--workers", "2", "--no-report", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([str(Path(sys.executable).with_name("hica-bench")), *command], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 180
    while not (results.is_file() and results.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines() == ["hica-bench: interrupted by SIGTERM; finished cells are kept in the results "
                                        "file (rerun the same command to resume)"]
    kept = records(results)
    assert 2 <= len(kept) < 6 and {r["status"] for r in kept} == {"ok"}
    again = hica_bench(*command, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(kept)} already finished, {6 - len(kept)} ran ok" in " ".join(again.stdout.split())
