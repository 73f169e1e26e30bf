"""Suites as files (TOML and YAML, flags override them) and encoders as a grid dimension (--encoders a,b)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, invoke
from hica_bench.suite import KEYS


@pytest.fixture(autouse=True)
def _test_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))  # -p pixel_encoder


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("form", ["toml", "yaml"])
def test_a_suite_file_runs_its_grid_and_flags_override_it(form, medmnist_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative out is taken from the working folder
    text = {"toml": 'datasets = ["breastmnist"]\nmethods = ["prototype", "linear-probe:C=1.0"]\nencoders = "pixels"\n'
                    'shots = [1, 2]\nseeds = "0,1"\nmax_test = 40\nout = "runs/suite"\n',
            "yaml": "datasets: [breastmnist]\nmethods:\n  - prototype\n  - linear-probe:C=1.0\nencoders: [pixels]\n"
                    "shots: [1, 2]\nseeds: 0,1\nmax_test: 40\nout: runs/suite\n"}[form]
    suite = tmp_path / f"paper.{form}"
    suite.write_text(text)
    common = ["-p", "pixel_encoder", "run", "--suite", suite, "--data-root", medmnist_root, "--cache-dir",
              tmp_path / "cache", "--quiet"]
    code, _, err = invoke(*common)
    assert code == 0, err
    records = read_records(tmp_path / "runs" / "suite")
    assert sorted((r["key"]["method"], r["key"]["k"], r["key"]["seed"]) for r in records) == sorted(
        (m, k, s) for m in ("prototype", "linear-probe:C=1.0") for k in (1, 2) for s in (0, 1))
    assert {(r["key"]["dataset"], r["key"]["encoder"], r["key"]["max_test"], r["n_test"]) for r in records} == {
        ("breastmnist", "pixels", 40, 40)}

    code, _, err = invoke(*common, "--shots", "3", "--methods", "prototype", "--max-test", "30", "--out", tmp_path / "flags")
    assert code == 0, err
    assert sorted((r["key"]["method"], r["key"]["k"], r["key"]["seed"], r["n_test"]) for r in read_records(tmp_path / "flags")) == [
        ("prototype", 3, 0, 30), ("prototype", 3, 1, 30)]  # the flags win; the suite's seeds remain


def test_encoders_are_a_grid_dimension(medmnist_root, tmp_path):
    args = ["-p", "pixel_encoder", "run", "--encoders", "pixels,pixels:side=8", "--datasets", "breastmnist",
            "--methods", "prototype", "--shots", "1", "--seeds", "0,1", "--data-root", medmnist_root,
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", "--backend", "eager", "--batch-size", "64",
            "--threads", "2", "--no-channels-last"]
    code, out, err = invoke(*args)
    assert code == 0, err
    records = read_records(tmp_path / "out")
    assert sorted((r["key"]["encoder"], r["key"]["seed"]) for r in records) == [
        ("pixels", 0), ("pixels", 1), ("pixels:side=8", 0), ("pixels:side=8", 1)]
    by = {(r["key"]["encoder"], r["key"]["seed"]): r for r in records}
    assert by["pixels", 0]["identity"]["origin"]["features"]["encoder"] == "test-pixels-16px-v1"
    assert by["pixels:side=8", 0]["identity"]["origin"]["features"]["encoder"] == "test-pixels-8px-v1"
    assert by["pixels", 0]["metrics"] != by["pixels:side=8", 0]["metrics"]  # really two encoders
    assert "4 ran ok" in " ".join(out.split())
    assert "feature cache: 0 hits, 4 misses" in " ".join(out.split())  # features once per encoder and split
    assert [line[20:] for line in err.splitlines() if "grid with" in line] == [  # one encoder after the other
        "grid with pixels: 2 cells, 0 already finished, 2 to run", "grid with pixels:side=8: 2 cells, 0 already finished, 2 to run"]
    headings = [line for line in (tmp_path / "out" / "leaderboard.md").read_text().splitlines() if line.startswith("## ")]
    assert headings == ["## breastmnist (28 px) — encoder `pixels`, full test split",
                        "## breastmnist (28 px) — encoder `pixels:side=8`, full test split"]

    code, out, _ = invoke(*args)  # a rerun finds every cell of both encoders finished
    assert code == 0 and "4 already finished" in " ".join(out.split())


BAD = {
    "unknown-key": ("toml", 'datasets = ["breastmnist"]\nshot = [1]\n', "unknown key 'shot' (known: " + ", ".join(KEYS) + ")"),
    "shots-not-numbers": ("toml", 'shots = ["one"]\n', "shots must be a non-empty list of whole numbers, got ['one']"),
    "size-text": ("yaml", "size: big\n", "size must be a whole number >= 1, got 'big'"),
    "empty-methods": ("toml", "methods = []\n", "methods must be a non-empty list of names, got []"),
    "repeated": ("yaml", "datasets: [breastmnist, breastmnist]\n", "datasets must be a list without repeats"),
    "bad-toml": ("toml", "datasets = [\n", "not valid TOML"),
    "bad-yaml": ("yaml", "datasets: [breastmnist\n", "not valid YAML"),
    "not-a-mapping": ("yaml", "- breastmnist\n", "must hold keys and values at the top level, got a list"),
    "other-suffix": ("json", "{}", "unknown format '.json'; use .toml, .yaml or .yml"),
    "unknown-method": ("toml", 'methods = ["prototype", "nope"]\n', "unknown method 'nope'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_suite_is_one_line_naming_the_key(case, tmp_path):
    form, text, message = BAD[case]
    suite = tmp_path / f"s.{form}"
    suite.write_text(text)
    code, _, err = invoke("-p", "pixel_encoder", "run", "--suite", suite, "--out", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hica-bench: error: ") and message in lines[0], (message, lines[0])
    assert not (tmp_path / "out").exists()


def test_a_missing_suite_file_is_one_line(tmp_path):
    code, _, err = invoke("run", "--suite", tmp_path / "nope.toml")
    assert code == 2 and err.strip() == f"hica-bench: error: suite {tmp_path / 'nope.toml'}: no such file"
