"""The CLI end to end on the real MedMNIST files, with the small pixel encoder from tests/plugins."""

import json
import re

import pytest

from conftest import hica_bench, tiny_clip_folder, write_medmnist_npz


def _results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_resume_and_leaderboard(medmnist_root, tmp_path):
    args = ["-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--methods", "zero-shot,linear-probe,prototype",
            "--shots", "1,5", "--seeds", "0,1",
            "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    first = hica_bench(*args)
    assert first.returncode == 0, first.stderr
    records = _results(tmp_path / "out")
    assert len(records) == 2 * 3 * 2 * 2  # datasets × methods × shots × seeds
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["key"]["method"] for r in ok} == {"linear-probe", "prototype"}
    assert all(r["status"] == "not_applicable" and "aligned" in r["reason"] for r in records if r["key"]["method"] == "zero-shot")
    assert all(len(r["identity"]["support"]) == 64 and r["environment"]["packages"]["hica-bench"] for r in ok)
    assert "0 hits, 4 misses" in first.stdout  # one encoder pass per dataset and split

    second = hica_bench(*args)
    assert second.returncode == 0, second.stderr
    assert "24 already finished" in second.stdout and "0 ran ok" in second.stdout
    assert _results(tmp_path / "out") == records  # nothing recomputed or appended

    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "breastmnist (28 px)" in board and "pneumoniamnist (28 px)" in board and "5-shot" in board
    rebuilt = hica_bench("leaderboard", str(tmp_path / "out" / "results.jsonl"), "--out", str(tmp_path / "lb"))
    assert rebuilt.returncode == 0 and (tmp_path / "lb" / "leaderboard.md").read_text() == board
    assert (tmp_path / "lb" / "leaderboard.csv").read_text().startswith("dataset,size,encoder,method,k")

    # new features: cache hits, and identical metrics after deleting the results
    (tmp_path / "out" / "results.jsonl").unlink()
    third = hica_bench(*args)
    assert "4 hits, 0 misses" in third.stdout
    assert [r["metrics"] for r in _results(tmp_path / "out")] == [r["metrics"] for r in records]


@pytest.mark.slow
def test_multiclass_rgb_dataset_in_medmnist_format(tmp_path):
    write_medmnist_npz(tmp_path / "data" / "bloodmnist_64.npz", n_classes=8, size=64, rgb=True, counts=(80, 8, 40))
    result = hica_bench("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "bloodmnist", "--size", "64",
                        "--methods", "linear-probe,prototype:temperature=0.1", "--shots", "1,5", "--seeds", "0",
                        "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                        "--max-test", "24")
    assert result.returncode == 0, result.stderr
    records = _results(tmp_path / "out")
    assert {r["key"]["method"] for r in records} == {"linear-probe", "prototype:temperature=0.1"}
    assert all(r["n_test"] == 24 and r["key"]["max_test"] == 24 for r in records)
    five_shot = [r for r in records if r["key"]["k"] == 5]
    assert all(r["metrics"]["acc"] > 0.5 for r in five_shot)  # 8 classes: chance is 0.125


def _error(result):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.slow
def test_missing_data_offline(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _error(hica_bench("-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist",
                             "--data-root", str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "cache")))
    assert "breastmnist.npz is missing from" in line and "could not be downloaded" in line and "put it at" in line
    assert "--data-root" in line and "$HICA_BENCH_DATA" in line
    line = _error(hica_bench("run", "--data-root", str(tmp_path / "nowhere")))
    assert "does not exist" in line


@pytest.mark.slow
def test_bad_input_keeps_finished_results(medmnist_root, tmp_path):
    args = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods", "prototype",
            "--shots", "1", "--seeds", "0", "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    assert hica_bench(*args).returncode == 0
    before = (tmp_path / "out" / "results.jsonl").read_text()
    _error(hica_bench(*args[:-2], "--out", str(tmp_path / "out"), "--shots", "500"))
    assert (tmp_path / "out" / "results.jsonl").read_text() == before


@pytest.mark.slow
def test_list_and_help():
    listed = hica_bench("-p", "faulty_methods", "list", "method")
    assert listed.returncode == 0 and "linear-probe *" in listed.stdout and "hica-bench-baselines" in listed.stdout
    assert "raises with [square brackets] in its message" in " ".join(listed.stdout.split())  # no markup eaten
    assert "unknown kind" in _error(hica_bench("list", "widgets"))
    for command in ([], ["run"], ["list"], ["leaderboard"]):
        shown = hica_bench(*command, "--help")
        assert shown.returncode == 0 and "Usage" in shown.stdout
        if command == ["run"]:
            help_text = " ".join(shown.stdout.split())
            assert "[default: $HICA_BENCH_DATA, else the dataset's own default]" in help_text
            assert "[default: the suite's, else the installed plugins' default suite]" in help_text


@pytest.mark.slow
def test_real_default_encoder_learns_breastmnist(medmnist_root, default_encoder_cache, tmp_path):
    """The offline default pair end to end: real ImageNet EfficientNet-Lite0 features of the real test split."""
    result = hica_bench("run", "--no-report", "--datasets", "breastmnist", "--methods", "linear-probe,zero-shot", "--shots", "20",
                        "--seeds", "0", "--data-root", str(medmnist_root), "--cache-dir", str(default_encoder_cache),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    records = {r["key"]["method"]: r for r in _results(tmp_path / "out")}
    probe = records["linear-probe"]
    assert probe["key"]["encoder"] == "effnet-lite0-minilm" and probe["n_test"] == 156
    assert probe["metrics"]["auc"] > 0.65 and probe["metrics"]["balanced_acc"] > 0.6  # chance: 0.5
    assert records["zero-shot"]["status"] == "not_applicable"


@pytest.mark.slow
def test_failing_cells_are_recorded_and_the_grid_goes_on(medmnist_root, tmp_path):
    result = hica_bench("-p", "pixel_encoder", "-p", "faulty_methods", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist",
                        "--methods", "raises,nans,brackets,prototype", "--shots", "1", "--seeds", "0,1",
                        "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    # on a pipe (a CI log, a Slurm file) the progress is plain timestamped lines on stderr: a line per failed cell, the
    # counts (every 10 s and when the cells are done)
    log = result.stderr.splitlines()
    assert log and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S", line) for line in log), result.stderr
    assert "grid with pixels: 8 cells, 0 already finished, 8 to run" in log[0]
    assert any(re.search(r"breastmnist (train|test) features: \d+ images encoded in [\d.]+ s \(\d+ img/s\)$", line) for line in log)
    cells = [line[20:] for line in log if line[20:].startswith("cell ")]
    assert len(cells) == 6 and all(": failed: " in c for c in cells), cells  # the failed ones, each with its reason
    assert re.fullmatch(r"cells 8/8: 2 ok, 0 not applicable, 6 failed \(last: breastmnist \S+ k=1 seed=1: .*\)",
                        log[-1][20:]), log[-1]
    assert any("brackets k=1 seed=1: failed: " in c and "option [lr] of [stage 2] is out of range [0, 1]" in c for c in cells)
    records = {(r["key"]["method"], r["key"]["seed"]): r for r in _results(tmp_path / "out")}
    assert len(records) == 8
    assert records[("raises", 0)]["status"] == "failed" and "deliberate failure in fit" in records[("raises", 0)]["reason"]
    assert records[("nans", 1)]["status"] == "failed" and "NaN" in records[("nans", 1)]["reason"]
    assert all(records[("prototype", s)]["status"] == "ok" for s in (0, 1))
    summary = " ".join(result.stdout.split())
    assert "2 ran ok, 0 not applicable, 6 failed" in summary and "deliberate failure" in summary
    assert "option [lr] of [stage 2] is out of range [0, 1]" in summary  # a reason's brackets are shown as written


@pytest.mark.slow
def test_zero_shot_runs_with_an_aligned_open_clip_pair(medmnist_root, tmp_path):
    """With an aligned pair zero-shot really runs (a random-init open_clip ViT, 2 layers at 32 px: the code path, not
    the accuracy), here on ONNX Runtime: an open_clip ViT exports cleanly through the dynamo exporter (the one a named
    backend uses)."""
    encoder = f"open-clip:model=local-dir:{tiny_clip_folder(tmp_path / 'tiny-clip')}:pretrained=random"
    result = hica_bench("run", "--no-report", "--datasets", "breastmnist", "--methods", "zero-shot,prototype", "--shots", "1", "--seeds", "0",
                        "--encoder", encoder, "--max-test", "32", "--data-root", str(medmnist_root),
                        "--backend", "onnxruntime", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "extraction: onnxruntime (dynamo export), batch 16" in " ".join(result.stdout.split())
    assert json.loads(next((tmp_path / "cache" / "onnx").glob("*/export.json")).read_text())["ok"]
    records = {r["key"]["method"]: r for r in _results(tmp_path / "out")}
    assert records["zero-shot"]["status"] == "ok" and records["zero-shot"]["key"]["encoder"] == encoder
    assert "random-init" in records["zero-shot"]["identity"]["origin"]["features"]["encoder"]
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "random init: not trained weights" in board and "random init" in " ".join(result.stdout.split())
    assert 0.0 <= records["zero-shot"]["metrics"]["auc"] <= 1.0 and records["zero-shot"]["n_test"] == 32


@pytest.mark.slow
def test_what_fit_chose_is_recorded(medmnist_root, tmp_path):
    result = hica_bench("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist",
                        "--methods", "linear-probe,knn", "--shots", "1,5", "--seeds", "0", "--data-root", str(medmnist_root),
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    fit = {(r["key"]["method"], r["key"]["k"]): r["fit_info"] for r in _results(tmp_path / "out")}
    assert fit[("linear-probe", 1)]["validation"].startswith("none") and fit[("linear-probe", 1)]["C"] == 10.0
    assert "5-fold CV" in fit[("linear-probe", 5)]["validation"] and fit[("linear-probe", 5)]["C"] in (0.1, 1.0, 10.0, 100.0, 1000.0)
    assert fit[("knn", 5)]["neighbours"] >= 1

