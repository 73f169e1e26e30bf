"""Working with runs (issue 14): per-class scores, saved predictions, --force, leaderboards over several results files,
and `hica-bench download`. Real CLI (in this process) on the real BreastMNIST file with the tiny `pixels` encoder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TEST_PLUGINS, invoke
from hica_bench.metrics import classification_metrics
from hica_bench.results import SCHEMA_VERSION


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


def grid(root, data, *extra):
    return ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist", "--methods",
            "linear-probe,prototype", "--shots", "1,5", "--seeds", "0", "--data-root", str(data), "--cache-dir",
            str(root / "cache"), "--out", str(root / "out"), "--backend", "eager", "--batch-size", "64", "--threads", "2",
            "--no-channels-last", *extra]


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_per_class_scores_and_saved_predictions_recompute_the_metrics(medmnist_root, tmp_path):
    code, out, err = invoke(*grid(tmp_path, medmnist_root, "--save-predictions"))
    assert code == 0, err
    for record in records(tmp_path / "out"):
        assert record["schema_version"] == SCHEMA_VERSION and record["predictions"] == f"predictions/{record['cell_id']}.npz"
        with np.load(tmp_path / "out" / record["predictions"], allow_pickle=False) as saved:
            proba, labels = saved["proba"], saved["labels"]
        assert proba.shape == (156, 2) and proba.dtype == np.float32 and len(labels) == 156
        again = classification_metrics(labels, proba.astype(np.float64))
        assert again.acc == record["metrics"]["acc"]
        assert abs(again.auc - record["metrics"]["auc"]) < 1e-6  # float32 storage of the probabilities
        per_class, confusion = record["per_class"], np.array(record["per_class"]["confusion"])
        assert confusion.sum() == 156 and confusion.trace() / 156 == record["metrics"]["acc"]
        assert np.allclose(per_class["recall"], confusion.diagonal() / confusion.sum(1))
        assert np.isclose(np.mean(per_class["recall"]), record["metrics"]["balanced_acc"])


def test_force_runs_the_selected_cells_again_and_the_newest_counts(medmnist_root, tmp_path):
    assert invoke(*grid(tmp_path, medmnist_root))[0] == 0
    first = records(tmp_path / "out")
    code, out, _ = invoke(*grid(tmp_path, medmnist_root, "--force"))
    assert code == 0 and "0 already finished, 4 ran ok" in " ".join(out.split())
    after = records(tmp_path / "out")
    assert after[:4] == first and len(after) == 8  # the old records stay, as they were
    assert [r["cell_id"] for r in after[4:]] == [r["cell_id"] for r in first]
    code, out, _ = invoke(*grid(tmp_path, medmnist_root))
    assert code == 0 and "4 already finished" in out


def test_a_leaderboard_of_several_results_files(medmnist_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(*grid(a, medmnist_root))[0] == 0
    args = grid(b, medmnist_root)
    args[args.index("--seeds") + 1] = "1"
    assert invoke(*args)[0] == 0
    code, out, err = invoke("leaderboard", a / "out", b / "out" / "results.jsonl", "--out", tmp_path / "both")
    assert code == 0, err
    board = (tmp_path / "both" / "leaderboard.md").read_text()
    assert "± " in board and "(2)" in board  # seeds 0 and 1, one from each file, averaged in one row
    shutil.copy(a / "out" / "results.jsonl", tmp_path / "copy.jsonl")
    code, _, err = invoke("leaderboard", a / "out", tmp_path / "copy.jsonl", "--out", tmp_path / "dup")
    assert code == 2 and "is in both" in err and len(err.strip().splitlines()) == 1


def test_download_puts_the_files_in_place(medmnist_root, tmp_path):
    shutil.copy(medmnist_root / "breastmnist.npz", tmp_path / "breastmnist.npz")
    code, out, err = invoke("download", "breastmnist", "--data-root", tmp_path)
    assert code == 0, err
    assert out.startswith("breastmnist (28 px): ready, medmnist/breastmnist@28/sha256:")
    assert "breastmnist: 2 classes: 0=malignant, 1=normal, benign; 546 train, 78 val, 156 test" in out
    code, _, err = invoke("download", "breastmnst", "--data-root", tmp_path)
    assert code == 2 and "did you mean breastmnist" in err
