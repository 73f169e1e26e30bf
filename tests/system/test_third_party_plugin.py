"""A third party's method, packaged and installed as users would, shows up and runs (no -p needed)."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import hica_bench, majority_plugin


@pytest.mark.slow
def test_installed_plugin_package_is_listed_and_runs(medmnist_root, tmp_path):
    package = tmp_path / "src" / "hica-bench-majority"
    (package / "hica_bench_majority").mkdir(parents=True)
    (package / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "hica-bench-majority"
        version = "1.2.3"
        dependencies = []

        [project.entry-points.hica_bench]
        majority = "hica_bench_majority"
    """))
    (package / "hica_bench_majority" / "__init__.py").write_text(majority_plugin())
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(target), str(package)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}  # this checkout's code first

    listed = hica_bench("list", "method", env=env)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if "majority" in line)
    assert "hica-bench-majority" in row and "1.2.3" in row and "alpha=1.0" in row

    ran = hica_bench("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist",
                     "--methods", "majority:alpha=0.5,prototype", "--shots", "1,5", "--seeds", "0",
                     "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                     env={**env, "PYTHONPATH": os.pathsep.join([str(target), str(__import__('conftest').TEST_PLUGINS),
                                                                os.environ.get("PYTHONPATH", "")])})
    assert ran.returncode == 0, ran.stderr
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "majority:alpha=0.5" in board
    # equal class priors at k shots: accuracy is the test share of class 0 (argmax of a tie)
    assert "26.9 (1)" in board  # one seed: no spread shown
