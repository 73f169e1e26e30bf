"""A real Ctrl-C still stops a run while a plugin's code runs (issue 31, class 3): a plugin's own KeyboardInterrupt
fails only its cell (tests/cli/test_plugin_faults.py), but SIGINT from outside, landing inside a method's fit, ends
the run with the one line and exit 130, keeping the finished cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS


@pytest.mark.timeout(300)
def test_sigint_inside_a_methods_fit_stops_the_run_and_keeps_finished_cells(medmnist_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    pids = tmp_path / "pids"
    run = subprocess.Popen(
        [str(Path(sys.executable).parent / "hica-bench"), "-p", "pixel_encoder", "-p", "slow_methods", "run",
         "--encoder", "pixels", "--datasets", "breastmnist", "--methods", f"prototype,sleepy:seconds=60:pid_dir={pids}",
         "--shots", "1", "--seeds", "0", "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"),
         "--out", str(tmp_path / "out"), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (pids.is_dir() and any(pids.iterdir())):  # the sleepy method is inside fit now
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert err.strip() == ("hica-bench: interrupted by SIGINT; finished cells are kept in the results file (rerun the "
                           "same command to resume)")
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["key"]["method"], r["status"]) for r in records] == [("prototype", "ok")]
