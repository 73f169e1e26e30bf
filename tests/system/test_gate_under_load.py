"""The throughput gate on a deliberately loaded CPU (a busy loop beside the run), with the real pretrained encoder:
clean code still passes, a real slowdown (ONNX Runtime off, so plain eager at a fixed batch: about 4x) is never
passed, and is caught as a regression where the load leaves the gate room to resolve it.

Under a share ``c`` of the CPUs taken, the gate only flags drops past ``1 - (1 - bound)(1 - c)`` (see
:mod:`hica_bench.check`): with one core of two busy (c = 0.5) that is 70 % or more, about where this 4x slowdown
lands (-75 % to -81 % measured on a 2-core VM), so there the honest verdicts are "regressed" or "not comparable";
with a core busy half the time (c = 0.25) the bound is 55 % and the slowdown must be caught, unless the runs' own
noise (the spread of their paired passes) widened it past the drop: then the gate rightly says "not comparable", and
the test is an expected failure saying so (a noisy shared VM did that once in six CI runs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke
from hica_bench.check import DEFAULT_THROUGHPUT_TOLERANCE

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.serial  # it loads the CPU itself and measures the load: alone, never beside another test

SETTINGS = ["--batch-size", "16", "--threads", "2", "--no-channels-last"]  # fixed: no probe, the same as the baseline's


@pytest.fixture
def small_breastmnist(medmnist_root, tmp_path) -> Path:
    """A folder with breastmnist.npz holding the real file's first 320 train and 40 test images (the same format),
    so that each encoder pass takes seconds even on a loaded CPU."""
    with np.load(medmnist_root / "breastmnist.npz") as real:
        arrays = {name: real[name][:320] if name.startswith("train") else real[name][:40] for name in real.files}
    (tmp_path / "data").mkdir()
    np.savez_compressed(tmp_path / "data" / "breastmnist.npz", **arrays)
    return tmp_path / "data"


#: a loop that keeps one core busy ``duty`` of the time (in 10 ms periods)
BUSY_LOOP = """import time
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < {duty} * 0.01:
        pass
    time.sleep((1 - {duty}) * 0.01)"""


def _run(medmnist_root: Path, root: Path, name: str, backend: str, busy: int, onnx_from: Path | None = None,
         duty: float = 1.0) -> Path:
    cache = root / name / "cache"
    if onnx_from is not None:  # the exported graph is reused (its export is not what is measured)
        shutil.copytree(onnx_from / "onnx", cache / "onnx")
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(duty=duty)]) for _ in range(busy)]
    try:
        code, _, err = invoke("run", "--no-report", "--datasets", "breastmnist", "--methods", "prototype", "--shots", "1", "--seeds", "0",
                              "--data-root", medmnist_root, "--no-download", "--cache-dir", cache,
                              "--out", root / name / "out", "--backend", backend, *SETTINGS, "--quiet")
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert code == 0, err
    return root / name / "out"


def _verdict(baseline: Path, run: Path, report: Path) -> tuple[int, dict]:
    code, _, _ = invoke("check", "--baseline", baseline, "--results", run, "--report", report)
    rows = json.loads(report.read_text())
    return code, next(r for r in rows if r["method"] == "(encoder pass)")


@pytest.mark.slow
@pytest.mark.timeout(600)  # four real-encoder runs, three of them beside a busy loop
def test_the_gate_holds_on_a_loaded_cpu(small_breastmnist, tmp_path, default_encoder_cache):
    exported = default_encoder_cache if (default_encoder_cache / "onnx").is_dir() else None  # another test's export
    baseline = _run(small_breastmnist, tmp_path, "baseline", "onnxruntime", busy=0, onnx_from=exported)
    clean = _run(small_breastmnist, tmp_path, "clean", "onnxruntime", busy=1, onnx_from=tmp_path / "baseline" / "cache")
    slow = _run(small_breastmnist, tmp_path, "slow", "eager", busy=1)
    loaded = json.loads((clean / "results.jsonl").read_text().splitlines()[0])["timings"]
    assert loaded["cpu_contention"] >= 0.2, loaded  # the busy loop was seen

    code, row = _verdict(baseline, clean, tmp_path / "clean.json")
    assert code == 0 and row["verdict"] in ("ok", "improved", "not comparable"), row
    code, row = _verdict(baseline, slow, tmp_path / "slow.json")
    assert row["verdict"] in ("regressed", "not comparable") and code == (row["verdict"] == "regressed"), row

    half = _run(small_breastmnist, tmp_path, "slow-half-load", "eager", busy=1, duty=0.5)
    load = json.loads((half / "results.jsonl").read_text().splitlines()[0])["timings"]["cpu_contention"]
    assert 0.1 <= load < 0.4, load  # the half-time loop was seen, as less than a whole core
    code, row = _verdict(baseline, half, tmp_path / "slow-half-load.json")
    if row["verdict"] == "not comparable":  # allowed only where the runs' own noise, not the load, hid the drop
        noise = re.search(r"own noise is ±(\d+) %", row["note"])
        assert noise is not None and int(noise.group(1)) > 100 * DEFAULT_THROUGHPUT_TOLERANCE, row
        drop = -float(row["change"].rstrip("%")) / 100
        assert drop > 1 - (1 - DEFAULT_THROUGHPUT_TOLERANCE) * (1 - load), row  # the load alone would have caught it
        pytest.xfail(f"the machine was too noisy to judge the half-load slowdown: {row['note']}")
    assert code == 1 and row["verdict"] == "regressed", row
