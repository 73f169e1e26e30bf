"""Scaling out (issue 17), measured with pytest-benchmark and reported as ratios taken in one run, never asserted:

- cells/s of a fit-dominated grid (30 HiCA cells on BreastMNIST with the default encoder pair: shots 1, 5, 20 ×
  seeds 0-9; every feature and HiCA's own per-dataset artifacts cached by an untimed first run): the in-process
  executor against ``--executor ray --workers 2`` (a local runtime the CLI starts), alternating; as whole processes
  (Ray's start-up and each worker's first build of the encoder pair included) and in the steady state (cells after
  the first, from the results' finish times) (target: Ray ≥ 1.6× on 2 cores);
- Ray's per-cell overhead on a trivial method (prototype on the test pixel encoder, 200 cells): one Ray worker
  against the in-process executor, on a runtime already started and warm, alternating; (Ray − in-process) ÷ cells
  (target ≤ 20 ms per cell).

    python -m pytest benchmarks/test_executors.py -s        # prints one report line per benchmark
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hica-bench[ray]')")

REPO = Path(__file__).resolve().parents[1]
TEST_PLUGINS = REPO / "tests" / "plugins"
ROUNDS = 3
FIT_GRID = ["--datasets", "breastmnist", "--methods", "hica", "--shots", "1,5,20", "--seeds", "0,1,2,3,4,5,6,7,8,9",
            "--no-report", "-q"]
CELLS = 30


def report(benchmark, text: str, **numbers) -> None:
    benchmark.extra_info.update(numbers)
    print(f"\n{text}")


def cli(*args: str, env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("hica-bench")), *args], env=env, cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    return wall


def steady_cells_per_s(results: Path, since: float) -> float:
    """Cells per second after the first cell of the newest run in ``results`` (its records finished after ``since``),
    from their finish times (1 s resolution): start-up and the first builds left out."""
    times = sorted(datetime.fromisoformat(json.loads(line)["finished_at"]).timestamp()
                   for line in results.read_text().splitlines() if line.strip())
    times = [t for t in times if t >= since - 1]
    assert len(times) == CELLS
    return (len(times) - 1) / max(times[-1] - times[0], 1.0)


def test_fit_dominated_grid_in_process_vs_ray(benchmark, medmnist_root, tmp_path):
    env = {**os.environ, "HICA_BENCH_DATA": str(medmnist_root), "HF_HUB_OFFLINE": "1",
           "HICA_BENCH_CACHE": str(tmp_path / "cache")}
    cli("run", *FIT_GRID, "--out", "warm", env=env, cwd=tmp_path)  # features and HiCA's artifacts into the cache
    ours, theirs, our_rate, their_rate = [], [], [], []

    def pair():
        since = time.time()
        ours.append(cli("run", *FIT_GRID, "--out", "in-process", "--force", env=env, cwd=tmp_path))
        our_rate.append(steady_cells_per_s(tmp_path / "in-process" / "results.jsonl", since))
        since = time.time()
        theirs.append(cli("run", *FIT_GRID, "--out", "ray", "--force", "--executor", "ray", "--workers", "2",
                          env=env, cwd=tmp_path))
        their_rate.append(steady_cells_per_s(tmp_path / "ray" / "results.jsonl", since))

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    whole = [a / b for a, b in zip(ours, theirs)]
    steady = [b / a for a, b in zip(our_rate, their_rate)]
    report(benchmark, f"fit-dominated grid ({CELLS} HiCA cells, cached features): whole process in-process "
                      f"{statistics.median(ours):.1f} s ({CELLS / statistics.median(ours):.3f} cells/s), Ray 2 workers "
                      f"{statistics.median(theirs):.1f} s ({CELLS / statistics.median(theirs):.3f} cells/s), speed-up "
                      f"median {statistics.median(whole):.2f}× (per round {', '.join(f'{r:.2f}' for r in whole)}); "
                      f"steady state {statistics.median(our_rate):.3f} vs {statistics.median(their_rate):.3f} cells/s, "
                      f"speed-up median {statistics.median(steady):.2f}× (per round "
                      f"{', '.join(f'{r:.2f}' for r in steady)})  [target ≥ 1.6×]",
           in_process_s=ours, ray_s=theirs, speedup=whole, steady_speedup=steady)


def test_ray_overhead_per_cell_on_a_trivial_method(benchmark, medmnist_root, tmp_path):
    from hica_bench import cli  # run in this process, so the Ray runtime started here serves its runs

    sys.path.insert(0, str(TEST_PLUGINS))
    seeds = ",".join(str(s) for s in range(200))
    grid = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods",
            "prototype", "--shots", "1", "--seeds", seeds, "--data-root", str(medmnist_root), "--cache-dir",
            str(tmp_path / "cache"), "--no-report", "-q", "--force"]
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        def timed(*extra) -> float:
            argv, sys.argv = sys.argv, ["hica-bench", *grid, *extra]
            err = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
                        pytest.raises(SystemExit) as exited:
                    cli.main()
            finally:
                sys.argv = argv
            assert exited.value.code == 0, err.getvalue()
            return time.perf_counter() - start

        timed("--out", str(tmp_path / "warm"), "--executor", "ray")  # features cached, the worker's imports done
        ours, theirs = [], []

        def pair():
            ours.append(timed("--out", str(tmp_path / "in-process")))
            theirs.append(timed("--out", str(tmp_path / "ray"), "--executor", "ray"))

        benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    finally:
        ray.shutdown()
        sys.path.remove(str(TEST_PLUGINS))
    overhead = [(b - a) / 200 * 1000 for a, b in zip(ours, theirs)]
    report(benchmark, f"Ray per-cell overhead (200 prototype cells, 1 worker, warm runtime): in-process "
                      f"{statistics.median(ours):.2f} s, Ray {statistics.median(theirs):.2f} s; overhead median "
                      f"{statistics.median(overhead):.1f} ms/cell (per round {', '.join(f'{o:.1f}' for o in overhead)})"
                      "  [target ≤ 20 ms/cell]", in_process_s=ours, ray_s=theirs, overhead_ms=overhead)
