"""A result records exactly what produced it (issue 12): resume reruns exactly the cells whose identity changed, and the
leaderboard and ``check`` never average results of different origins.

Each step is a real ``hica-bench run`` over real files: the real BreastMNIST and PneumoniaMNIST arrays (copied, so a
test can edit one), a third party's method plugin installed as a distribution (its version and option defaults
changed between runs), and the real timm encoder family with a checkpoint file that is replaced at the same path.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_PLUGINS, invoke, majority_plugin, write_medmnist_npz
from test_check import cli


def install_plugin(site: Path, version: str, alpha: float) -> None:
    """The README's example method plugin as an installed distribution ``hica-bench-idmajority`` (module and dist-info
    on the path), replacing any earlier version, as ``pip install -U`` would."""
    for old in site.glob("hica_bench_idmajority-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"hica_bench_idmajority-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hica-bench-idmajority\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[hica_bench]\nmajority = idmajority\n")
    (site / "idmajority.py").write_text(majority_plugin(alpha))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def summary_line(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("cells:"))


@pytest.mark.slow
def test_resume_reruns_exactly_the_cells_whose_identity_changed(medmnist_root, tmp_path, monkeypatch):
    """Runs in this process (the console script's main): the plugin's module is forgotten before each run, so each
    run imports the version then installed, as a new process would."""
    data, site, out = tmp_path / "data", tmp_path / "site", tmp_path / "out"
    data.mkdir()
    for name in ("breastmnist.npz", "pneumoniamnist.npz"):
        shutil.copy(medmnist_root / name, data / name)
    install_plugin(site, "1.0.0", 1.0)
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    monkeypatch.syspath_prepend(str(site))
    args = ["-p", "pixel_encoder", "run", "--encoder", "pixels", "--datasets", "breastmnist,pneumoniamnist",
            "--methods", "majority,prototype", "--shots", "1,5", "--seeds", "0,1", "--data-root", str(data),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]

    def run(expected: str) -> list[dict]:
        sys.modules.pop("idmajority", None)
        importlib.invalidate_caches()
        code, stdout, stderr = invoke(*args)
        assert code == 0, stderr
        summary = next(line for line in stdout.splitlines() if line.startswith("cells:"))
        assert summary == f"cells: 16 in grid, {expected}", stdout
        return records(out)

    first = run("0 already finished, 16 ran ok, 0 not applicable, 0 failed")
    assert run("16 already finished, 0 ran ok, 0 not applicable, 0 failed") == first  # nothing changed: nothing reruns

    install_plugin(site, "1.0.1", 1.0)  # (c) the method's distribution upgraded: only its 8 cells rerun
    upgraded = run("8 already finished, 8 ran ok, 0 not applicable, 0 failed")
    new = upgraded[16:]
    assert {r["key"]["method"] for r in new} == {"majority"} and upgraded[:16] == first  # old records kept as they were
    assert {r["identity"]["origin"]["method"]["version"] for r in new} == {"1.0.1"}
    assert all(r["identity"]["origin"]["method"]["distribution"] == "hica-bench-idmajority" for r in new)

    install_plugin(site, "1.0.1", 2.0)  # (d) an option default changed, same version: the label stays "majority"
    changed_default = run("8 already finished, 8 ran ok, 0 not applicable, 0 failed")[24:]
    assert {r["key"]["method"] for r in changed_default} == {"majority"}
    assert {r["identity"]["origin"]["method"]["options"]["alpha"] for r in changed_default} == {2.0}

    with np.load(data / "breastmnist.npz") as npz:  # (e) one dataset file edited: only its 8 cells rerun
        arrays = dict(npz)
    arrays["test_images"][0, 0, 0] ^= 0xFF
    np.savez_compressed(data / "breastmnist.npz", **arrays)
    edited = run("8 already finished, 8 ran ok, 0 not applicable, 0 failed")[32:]
    assert {r["key"]["dataset"] for r in edited} == {"breastmnist"} and {r["key"]["method"] for r in edited} == {"majority", "prototype"}
    assert len({r["identity"]["origin"]["dataset_identity"] for r in edited + first if r["key"]["dataset"] == "breastmnist"}) == 2

    # the leaderboard never averages across origins: PneumoniaMNIST's majority has 3 (each 2 seeds), prototype 1
    board = (out / "leaderboard.md").read_text()
    pneumonia = board[board.index("## pneumoniamnist"):]
    majority_rows = [line for line in pneumonia.split("**AUC**")[0].splitlines() if line.startswith("| majority ⟨")]
    assert len(majority_rows) == 3 and all(line.count("(2)") == 2 for line in majority_rows), majority_rows
    assert "| prototype " in pneumonia and "| prototype ⟨" not in pneumonia
    assert "`majority` has results of 3 origins, never averaged together" in pneumonia
    assert "method.options.alpha: 1.0 → 2.0" in pneumonia and "method.version: 1.0.0 → 1.0.1" in pneumonia
    breast = board[board.index("## breastmnist"):board.index("## pneumoniamnist")]
    assert "dataset_identity: medmnist/breastmnist@28/sha256:" in breast  # what differs between its two file versions
    csv = (out / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,size,encoder,method,k,max_test,origin,")
    assert sum(",majority," in line and line.startswith("pneumoniamnist") for line in csv) == 3 * 2  # 3 origins × 2 shots

    # check compares the newest origin of each cell and says so; against itself it is clean
    code, stdout, stderr = invoke("check", "--baseline", out, "--results", out)
    assert code == 0, stdout + stderr
    assert "holds results of several origins for 6 cells" in " ".join(stdout.split())


@pytest.mark.slow
def test_a_new_checkpoint_at_the_same_path_or_another_backend_reruns_the_grid(tmp_path, capsys):
    """(a) The real timm family's identity is the checkpoint file's digest: new weights at the same path rerun every
    cell and compute new features; (b) --backend eager vs onnxruntime are different feature origins."""
    import timm
    import torch
    from safetensors.torch import save_file

    write_medmnist_npz(tmp_path / "data" / "breastmnist.npz", 2, counts=(24, 4, 16))
    checkpoint = tmp_path / "weights.safetensors"

    def save_weights(seed: int) -> None:
        torch.manual_seed(seed)
        save_file(timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict(), str(checkpoint))

    save_weights(1)
    args = ["run", "--encoder", f"timm:model=test_resnet:checkpoint={checkpoint}:text=", "--datasets", "breastmnist",
            "--methods", "prototype,linear-probe", "--shots", "1,3", "--seeds", "0", "--data-root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--batch-size", "16", "--threads", "2",
            "--no-channels-last"]

    def run(*extra: str) -> tuple[str, str]:
        result = cli(capsys, *args, *extra)  # in this process (the console script's main): torch is imported once
        assert result.returncode == 0, result.stderr
        cache = next(line for line in result.stdout.splitlines() if line.startswith("feature cache:"))
        return summary_line(result), cache

    ran_all = "cells: 4 in grid, 0 already finished, 4 ran ok, 0 not applicable, 0 failed"
    cells, cache = run("--backend", "eager")
    assert cells == ran_all and cache.startswith("feature cache: 0 hits, 2 misses")
    save_weights(2)  # other weights, same path, same label: every cell reruns, on newly computed features
    cells, cache = run("--backend", "eager")
    assert cells == ran_all and cache.startswith("feature cache: 0 hits, 2 misses")
    cells, cache = run("--backend", "onnxruntime")  # another backend: every cell again, on its own features
    assert cells == ran_all and cache.startswith("feature cache: 0 hits, 2 misses")
    cells, cache = run("--backend", "onnxruntime")
    assert cells == "cells: 4 in grid, 4 already finished, 0 ran ok, 0 not applicable, 0 failed"
    found = records(tmp_path / "out")
    assert len(found) == 12
    weights = {r["identity"]["origin"]["features"]["encoder"] for r in found}
    backends = [r["identity"]["origin"]["features"]["backend"] for r in found]
    assert len(weights) == 2 and all(w.startswith("timm:test_resnet:sha256=") for w in weights)
    assert backends == ["eager"] * 8 + ["onnxruntime"] * 4
    assert len({r["identity"]["origin"]["features"]["encoder"] for r in found[4:]}) == 1  # the new weights, both backends
    assert {r["key"]["encoder"] for r in found} == {f"timm:checkpoint={checkpoint}:model=test_resnet:text="}  # one label
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert board.count("| prototype ⟨") == 2 * 3  # ACC and AUC tables: three origins each
    assert "features.backend: eager → onnxruntime" in board and "features.encoder: timm:test_resnet:sha256=" in board

