"""The robustness track (issue 20) through the CLI in this process: corrupted grids end to end, bad input (split from
tests/unit/test_corruptions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_PLUGINS, invoke, write_medmnist_npz
from hica_bench import corruptions as C


def _run(tmp_path: Path, *args) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        return invoke("-p", "pixel_encoder", "run", "--encoder", "pixels", "--methods", "prototype,knn",
                      "--shots", "1,5", "--seeds", "0,1", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out",
                      *args)


def test_a_robustness_grid_end_to_end(medmnist_root, tmp_path):
    """--corruptions/--severities on the real BreastMNIST: every corrupted cell is an ordinary result with its
    corruption and severity, the same support sets as the clean cells, clean train features encoded once; the
    leaderboard keeps them out of its tables and summarises them in the robustness table, robustness.csv and the
    report."""
    code, out, err = _run(tmp_path, "--datasets", "breastmnist", "--data-root", medmnist_root,
                          "--corruptions", "speckle_noise,contrast_down", "--severities", "1,5", "--save-predictions")
    assert code == 0, err
    assert ("breastmnist: test split also corrupted (breastmnist set): 2 corruptions (contrast_down, speckle_noise) x "
            "severities 1,5") in " ".join(out.split()), out
    # the log's counts name the last cell, with its corruption
    assert "cells 40/40: 40 ok, 0 not applicable, 0 failed (last: breastmnist (" in err and "severity 5) knn k=5" in err
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * (1 + 4) and all(r["status"] == "ok" for r in records)
    supports = {}
    for r in records:
        key = r["key"]
        assert key["dataset"] == "breastmnist" and (key["corruption"] is None) == (key["severity"] is None)
        origin = r["identity"]["origin"]
        if key["corruption"] is not None:
            assert origin["corruption"]["name"] == key["corruption"] and origin["corruption"]["set"] == "breastmnist"
            assert origin["corruption"]["parameter"] == C.SETS["breastmnist"][key["corruption"]][key["severity"] - 1]
        supports.setdefault((key["method"], key["k"], key["seed"]), set()).add(r["identity"]["support"])
    assert all(len(s) == 1 for s in supports.values())  # supports never change with the test split's corruption
    assert len({r["cell_id"] for r in records}) == len(records)
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        labels = npz["test_labels"][:, 0]
    for r in records:  # each corrupted cell's saved predictions: its own test split, scored against its labels
        with np.load(tmp_path / "out" / r["predictions"]) as saved:
            np.testing.assert_array_equal(saved["labels"], labels)
            assert np.isclose((saved["proba"].argmax(1) == labels).mean(), r["metrics"]["acc"])
    cache = tmp_path / "cache" / "features"
    assert len(list(cache.glob("*.npy"))) == 2 + 4  # clean train and test, and the four corrupted test splits
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    main, robust = board.split("# Robustness")
    assert "speckle" not in main and "| prototype" in main
    assert len([line for line in robust.splitlines() if line.startswith(("| prototype", "| knn"))]) == 4
    import pandas as pd

    everything = pd.read_csv(tmp_path / "out" / "robustness.csv", dtype={"seeds": str})
    table = everything[everything["corruption"].isna()]  # over every corruption and severity
    assert len(table) == 4 and set(table["method"]) == {"prototype", "knn"} and set(table["k"]) == {1, 5}
    # per corruption (its BE and rBE terms) and per (corruption, severity): the paired drop, recomputed from the records
    variants = everything[everything["severity"].notna()]
    per_corruption = everything[everything["corruption"].notna() & everything["severity"].isna()]
    assert len(variants) == 4 * 4 and len(per_corruption) == 4 * 2 and per_corruption["be"].notna().all()
    by_cell = {(r["key"]["method"], r["key"]["k"], r["key"]["corruption"], r["key"]["severity"], r["key"]["seed"]):
               r["metrics"]["acc"] for r in records}
    row = variants[(variants["method"] == "knn") & (variants["k"] == 5) & (variants["corruption"] == "speckle_noise")
                   & (variants["severity"] == 5)].iloc[0]
    drops = [100 * (by_cell["knn", 5, None, None, s] - by_cell["knn", 5, "speckle_noise", 5, s]) for s in (0, 1)]
    assert row["acc_drop_pp"] == pytest.approx(np.mean(drops), abs=1e-3) and row["variants"] == 1
    assert (table["variants"] == 4).all() and (table["corruptions"] == 2).all() and (table["seeds"] == "0,1").all()
    assert (table["be"] > 0).all() and table["rbe"].notna().all()  # MedMNIST-C published AlexNet's BreastMNIST errors
    drop = table["acc_clean"] - table["acc_corrupted"]
    np.testing.assert_allclose(100 * drop, table["acc_drop_pp"], atol=1e-3)  # the CSV keeps 6 decimals
    assert "robustness" in (tmp_path / "out" / "report.html").read_text()
    code, out, err = invoke("check", "--baseline", tmp_path / "out", "--results", tmp_path / "out")
    assert code == 0 and "20 cells compared" in out, out + err  # corrupted cells are cells of their own


def test_rgb_and_own_folder_datasets_get_the_generic_set(tmp_path, medmnist_root):
    """An RGB dataset in the MedMNIST format that MedMNIST-C does not define, and a grey own-data folder, run with
    the generic set (ChestMNIST's corruptions, per channel on RGB)."""
    write_medmnist_npz(tmp_path / "data" / "bloodmnist.npz", 8, rgb=True)
    code, _, err = _run(tmp_path, "--datasets", "bloodmnist", "--data-root", tmp_path / "data", "--no-download",
                        "--corruptions", "gaussian_noise,gamma_corr_up", "--severities", "3", "--shots", "1", "-q")
    assert code == 0, err
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        images, labels = npz["test_images"][:20], npz["test_labels"][:20, 0]
    for split in ("train", "test"):
        for i, (x, y) in enumerate(zip(images, labels)):
            path = tmp_path / "folder" / split / ("malignant" if y == 0 else "normal") / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(path)
    code, _, err = _run(tmp_path, "--datasets", f"folder:root={tmp_path / 'folder'}", "--corruptions", "all",
                        "--severities", "2", "--shots", "1", "--out", tmp_path / "out-folder", "-q")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out-folder" / "results.jsonl").read_text().splitlines()]
    corrupted = {r["key"]["corruption"] for r in records} - {None}
    assert corrupted == set(C.SETS["generic"]) and all(r["status"] == "ok" for r in records)
    assert {r["identity"]["origin"]["corruption"]["set"] for r in records if r["key"]["corruption"]} == {"generic"}


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "speckle_nois"], "did you mean speckle_noise"),
    (["--corruptions", "gaussian_noise"], "'gaussian_noise' is not in MedMNIST-C's breastmnist set"),
    (["--corruptions", "pixelate", "--severities", "6"], "severity must be 1 to 5, got 6"),
    (["--severities", "2"], "--severities needs --corruptions"),
    (["--datasets", "breastmnist:corruption=pixelate"], "needs both corruption=NAME and severity=1..5"),
    (["--datasets", "breastmnist:corruption=pixelate:severity=x"], "severity must be 1 to 5, got 'x'"),
])
def test_bad_corruption_input_is_one_line(args, message, medmnist_root, tmp_path):
    if "--datasets" not in args:
        args = ["--datasets", "breastmnist", *args]
    code, _, err = _run(tmp_path, "--data-root", medmnist_root, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out" / "results.jsonl").exists()
