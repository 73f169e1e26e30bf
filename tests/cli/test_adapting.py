"""Methods that adapt the encoder (issue 18): the contract (``encoder_``), the frozen cache and encoder left alone,
the fallback to frozen features, the baselines ``finetune`` and ``clip-lora``, HiCA's encoder stage 1, determinism.

Grids run on the real BreastMNIST through the real CLI, with the test plugin ``adapting_methods`` (a torch encoder
small enough to fine-tune in a test, and methods that break the contract on purpose) or a tiny random-init open_clip
model saved as a local checkpoint in open_clip's own format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, invoke

GRID = ["--datasets", "breastmnist", "--shots", "1", "--seeds", "0", "--max-test", "48", "--no-report", "-q"]


def run(medmnist_root: Path, cache: Path, out: Path, *args, code: int = 0) -> dict[str, dict]:
    """``hica-bench -p adapting_methods run ...`` in this process (exit ``code``: 1 when a cell failed); the records by
    method label."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        exit_code, _, err = invoke("-p", "adapting_methods", "run", *GRID, "--data-root", medmnist_root,
                                   "--cache-dir", cache, "--out", out, *args)
    assert exit_code == code, err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["key"]["method"]: r for r in records}


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and "features" in p.parts}


def test_the_adapted_encoder_changes_the_test_features_of_its_own_cell_only(medmnist_root, tmp_path):
    cache = tmp_path / "cache"
    first = run(medmnist_root, cache, tmp_path / "first", "--encoder", "torch-pixels", "--methods", "reveal")
    frozen = first["reveal"]["fit_info"]["test_features"]
    before = files(cache)
    assert before, "the frozen features were cached"
    grid = run(medmnist_root, cache, tmp_path / "second", "--encoder", "torch-pixels", "--methods",
               "reveal:tag=before,shift,shift-hidden,reveal:tag=after")
    assert all(r["status"] == "ok" for r in grid.values()), grid
    shifted = grid["shift"]
    assert shifted["fit_info"]["test_features"] != frozen  # predicted through its adapted encoder
    assert shifted["adapted_encoder"].startswith("test-torch-pixels-v1+shift:sha256=")
    assert shifted["timings"]["adapted_encode_s"] > 0 and shifted["timings"]["adapted_images_per_s"] > 0
    # the frozen features, before and after the adapting cell, and for the method that exposes nothing
    assert grid["reveal:tag=before"]["fit_info"]["test_features"] == frozen
    assert grid["reveal:tag=after"]["fit_info"]["test_features"] == frozen
    assert grid["shift-hidden"]["fit_info"]["test_features"] == frozen and grid["shift-hidden"]["adapted_encoder"] is None
    after = files(cache)
    assert {name: after[name] for name in before} == before  # the frozen cache entries were not touched ...
    assert len(after) > len(before)  # ... and the adapted features went to entries of their own


def test_changing_the_frozen_encoder_or_borrowing_its_identity_fails_the_cell(medmnist_root, tmp_path):
    """Both fail their cell; the frozen weights are put back, so the next dataset is encoded as in a clean run."""
    two = ["--datasets", "breastmnist,pneumoniamnist", "--encoder", "torch-pixels", "--backend", "eager"]
    run(medmnist_root, tmp_path / "clean-cache", tmp_path / "clean", *two, "--methods", "reveal")
    clean = [json.loads(line) for line in (tmp_path / "clean" / "results.jsonl").read_text().splitlines()]
    clean = next(r for r in clean if r["key"]["dataset"] == "pneumoniamnist")
    out = tmp_path / "out"
    run(medmnist_root, tmp_path / "cache", out, *two, "--methods", "in-place,same-identity,train-mode,reveal", code=1)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["key"]["dataset"], r["key"]["method"]): r for r in records}
    for dataset in ("breastmnist", "pneumoniamnist"):
        assert by[dataset, "in-place"]["status"] == "failed"
        assert "changed the frozen encoder's weights or modes in place" in by[dataset, "in-place"]["reason"]
        assert by[dataset, "train-mode"]["status"] == "failed"
        assert "changed the frozen encoder" in by[dataset, "train-mode"]["reason"]
        assert by[dataset, "same-identity"]["status"] == "failed"
        assert "identity of its own" in by[dataset, "same-identity"]["reason"]
    assert by["pneumoniamnist", "reveal"]["status"] == "ok"  # the grid went on, with the frozen weights
    assert by["pneumoniamnist", "reveal"]["fit_info"] == clean["fit_info"]


def test_finetune_and_hica_encoder_stage1_are_seeded(medmnist_root, tmp_path):
    """Two runs with the same arguments (each with a fresh cache, so HiCA's stage 1 is trained twice) give the same
    numbers on CPU; stage 1 is cached and reused by the second cell of a run."""
    methods = ["--encoder", "torch-pixels", "--methods",
               "finetune:steps=10,hica-encoder:stage1_encoder_epochs=1:stage1_max_images=96:epochs=20",
               "--shots", "1,5"]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run(medmnist_root, tmp_path / f"cache-{name}", out, *methods)
        runs.append([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()])
    for one, two in zip(*runs):
        assert one["status"] == two["status"] == "ok", (one["reason"], two["reason"])
        assert one["metrics"] == two["metrics"] and one["adapted_encoder"] == two["adapted_encoder"]
    hica = [r for r in runs[0] if r["key"]["method"].startswith("hica-encoder")]
    assert [r["fit_info"]["stage1_cached"] for r in hica] == [False, True]
    assert hica[0]["adapted_encoder"] == hica[1]["adapted_encoder"]  # one stage 1 per dataset: one adapted encoder
    assert hica[0]["fit_info"]["stage1_text"].startswith("frozen")  # the toy text encoder cannot be fine-tuned
    tuned = [r for r in runs[0] if r["key"]["method"].startswith("finetune")]
    assert tuned[0]["adapted_encoder"] != tuned[1]["adapted_encoder"]  # per cell: its own support set


def test_clip_lora_on_a_local_random_init_open_clip_checkpoint(medmnist_root, tmp_path):
    from test_conformance import tiny_clip_checkpoint

    folder = tiny_clip_checkpoint(tmp_path / "tiny-clip")
    grid = run(medmnist_root, tmp_path / "cache", tmp_path / "out", "--encoder", f"open-clip:model=local-dir:{folder}",
               "--methods", "clip-lora:iterations=8,zero-shot")
    lora = grid["clip-lora:iterations=8"]
    assert lora["status"] == "ok", lora["reason"]
    assert "+clip-lora-r2-a1:sha256=" in lora["adapted_encoder"] and "random-init" not in lora["adapted_encoder"]
    assert lora["fit_info"]["projections"] == 4  # q/k/v packed in each of 2 vision and 2 text layers
    assert lora["fit_info"]["iterations"] == 8 and grid["zero-shot"]["status"] == "ok"
    unaligned = run(medmnist_root, tmp_path / "cache", tmp_path / "unaligned", "--encoder", "torch-pixels",
                    "--methods", "clip-lora")
    assert unaligned["clip-lora"]["status"] == "not_applicable"
    assert "aligned" in unaligned["clip-lora"]["reason"]


def test_a_selecting_protocol_scores_each_candidate_through_the_encoder_it_adapted(medmnist_root, tmp_path):
    """``shift`` declares a search space over how far it moves its adapted copy of the encoder. Under few-shot-val each
    candidate is scored on the validation images encoded through its own adapted encoder; under the oracle on the test
    split so encoded, so the chosen candidate's recorded score is exactly the final cell's (fitted again, predicting
    through its adapted encoder)."""
    cache = tmp_path / "cache"
    records = run(medmnist_root, cache, tmp_path / "o", "--encoder", "torch-pixels", "--methods", "shift",
                  "--protocols", "few-shot-val,oracle", "--shots", "2")
    by_protocol = {}
    for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_protocol[record["key"]["protocol"]] = record
    for protocol, record in by_protocol.items():
        assert record["status"] == "ok", record["reason"]
        selection = record["fit_info"]["selection"]
        assert [c["options"]["amount"] for c in selection["candidates"]] == [0.5, 0.0, 2.0]
        assert record["adapted_encoder"].startswith("test-torch-pixels-v1+shift:sha256=")
    oracle = by_protocol["oracle"]["fit_info"]["selection"]
    best = max(c["score"] for c in oracle["candidates"])
    assert best == pytest.approx(by_protocol["oracle"]["metrics"]["balanced_acc"], abs=1e-9)
    assert len({c["score"] for c in oracle["candidates"]}) > 1  # the adapted encoders differ, and so do their scores
    assert by_protocol["few-shot-val"]["fit_info"]["selection"]["scored_on"]["split"] == "val"
    assert set(records) == {"shift"}
