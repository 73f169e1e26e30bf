"""A run does only the work its cells need: --max-test N encodes those N test images (a cache entry of its own,
never taken for the whole split, also served from a cached whole split), and a grid whose methods need no support
features (zero-shot alone) never encodes the train split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_PLUGINS, invoke

EXTRACTION = ["--backend", "eager", "--batch-size", "64", "--threads", "2", "--no-channels-last", "--quiet"]


@pytest.fixture(autouse=True)
def _test_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


def _entries(cache: Path) -> dict[str, dict]:
    """The feature cache's entries: split (with ``[:rows]`` for a prefix) -> their meta."""
    entries = {}
    for meta_path in (cache / "features").glob("*.json"):
        meta = json.loads(meta_path.read_text())
        parts = meta["parts"]
        entries[parts["split"] + (f"[:{parts['rows']}]" if "rows" in parts else "")] = meta
    return entries


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, medmnist_root: Path, out: str, *args: str) -> str:
    code, stdout, err = invoke("-p", "pixel_encoder", "-p", "toy_aligned_encoder", "run", "--no-report", "--datasets", "breastmnist",
                               "--shots", "1", "--seeds", "0", "--data-root", medmnist_root, "--cache-dir",
                               tmp_path / "cache", "--out", tmp_path / out, *EXTRACTION, *args)
    assert code == 0, err
    return " ".join(stdout.split())


def test_max_test_encodes_only_the_images_it_evaluates(medmnist_root, tmp_path):
    summary = _run(tmp_path, medmnist_root, "a", "--encoders", "pixels", "--methods", "prototype", "--max-test", "40")
    assert "breastmnist │ test │ 40 " in summary and "breastmnist │ train │ 546 " in summary
    entries = _entries(tmp_path / "cache")
    assert sorted(entries) == ["test[:40]", "train"] and entries["test[:40]"]["shape"][0] == 40

    summary = _run(tmp_path, medmnist_root, "b", "--encoders", "pixels", "--methods", "prototype")  # the whole split
    assert "breastmnist │ test │ 156 │ encoder" in summary  # computed: the prefix is not taken for it
    assert sorted(_entries(tmp_path / "cache")) == ["test", "test[:40]", "train"]

    summary = _run(tmp_path, medmnist_root, "c", "--encoders", "pixels", "--methods", "prototype", "--max-test", "30")
    assert "breastmnist │ test │ 30 │ cache" in summary  # sliced from the whole split's entry
    assert sorted(_entries(tmp_path / "cache")) == ["test", "test[:40]", "train"]
    whole = np.load(tmp_path / "cache" / "features" / f"{_key(tmp_path, 'test')}.npy")
    prefix = np.load(tmp_path / "cache" / "features" / f"{_key(tmp_path, 'test[:40]')}.npy")
    np.testing.assert_array_equal(prefix[:30], whole[:30])  # eager at a fixed batch size: the same bits
    by_run = {name: _records(tmp_path / name)[0] for name in "abc"}
    assert [by_run[n]["n_test"] for n in "abc"] == [40, 156, 30]
    assert len({by_run[n]["cell_id"] for n in "abc"}) == 3  # max_test is part of the identity


def _key(tmp_path: Path, split: str) -> str:
    for meta_path in (tmp_path / "cache" / "features").glob("*.json"):
        parts = json.loads(meta_path.read_text())["parts"]
        if parts["split"] + (f"[:{parts['rows']}]" if "rows" in parts else "") == split:
            return meta_path.stem
    raise AssertionError(split)


def test_a_zero_shot_grid_never_encodes_the_train_split(medmnist_root, tmp_path):
    summary = _run(tmp_path, medmnist_root, "zs", "--encoders", "toy-aligned", "--methods", "zero-shot")
    assert "1 ran ok" in summary and "│ train" not in summary.split("extraction")[0]  # no train row in the passes
    assert sorted(_entries(tmp_path / "cache")) == ["test"]
    assert _records(tmp_path / "zs")[0]["status"] == "ok"

    summary = _run(tmp_path, medmnist_root, "both", "--encoders", "toy-aligned", "--methods", "zero-shot,tip-adapter")
    assert "2 ran ok" in summary and "breastmnist │ train │ 546 │ encoder" in summary  # tip-adapter needs them
    assert sorted(_entries(tmp_path / "cache")) == ["test", "train"]
    zs = [r for r in _records(tmp_path / "both") if r["key"]["method"] == "zero-shot"]
    assert zs[0]["metrics"] == _records(tmp_path / "zs")[0]["metrics"]  # with or without train features: the same
