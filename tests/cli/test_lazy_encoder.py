"""A run builds the encoder only when it needs its models: an encoder spec with a ``describe`` hook gives the run the
identities it needs to find cached features and finished cells, so a run served from the cache builds nothing and,
with the default pair, never imports torch (issue 14: start-up cost only when needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEST_PLUGINS, invoke, write_medmnist_npz

EXTRACTION = ["--backend", "eager", "--batch-size", "64", "--threads", "2", "--no-channels-last", "--quiet"]


@pytest.fixture(autouse=True)
def _test_plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))


@pytest.fixture
def builds():
    import toy_aligned_encoder

    toy_aligned_encoder.BUILDS.clear()
    return toy_aligned_encoder.BUILDS


def _run(tmp_path: Path, medmnist_root: Path, methods: str, *extra: str, encoder: str = "toy-described"):
    return invoke("-p", "toy_aligned_encoder", "run", "--no-report", "--encoders", encoder, "--datasets", "breastmnist",
                  "--methods", methods, "--shots", "1", "--seeds", "0,1", "--max-test", "40", "--data-root", medmnist_root,
                  "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", *EXTRACTION, *extra)


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_a_run_served_from_the_cache_builds_no_encoder(medmnist_root, tmp_path, builds):
    code, _, err = _run(tmp_path, medmnist_root, "prototype")
    assert code == 0, err
    assert builds == ["cpu"]  # features had to be computed: built once
    first = _records(tmp_path)

    code, _, err = _run(tmp_path, medmnist_root, "prototype", "--force")  # the cells again, every feature cached
    assert code == 0, err
    assert builds == ["cpu"]  # not built again
    again = _records(tmp_path)[len(first):]
    assert [r["identity"] for r in again] == [r["identity"] for r in first]  # the card gave the very same identities
    assert [r["metrics"] for r in again] == [r["metrics"] for r in first]


def test_a_method_that_uses_the_text_encoder_builds_the_pair_on_first_use(medmnist_root, tmp_path, builds):
    assert _run(tmp_path, medmnist_root, "prototype")[0] == 0  # fills the cache
    code, _, err = _run(tmp_path, medmnist_root, "zero-shot")  # test features cached; class texts need the text tower
    assert code == 0, err
    assert builds == ["cpu", "cpu"]  # once more, for the first zero-shot cell only (not per cell)
    zero_shot = [r for r in _records(tmp_path) if r["key"]["method"] == "zero-shot"]
    assert len(zero_shot) == 2 and all(r["status"] == "ok" for r in zero_shot)


def test_a_card_that_disagrees_with_the_built_pair_stops_the_run(medmnist_root, tmp_path, builds):
    code, _, err = _run(tmp_path, medmnist_root, "prototype", encoder="toy-described:lie=True")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "toy-described:lie=True: the plugin's describe() gave" in err and "must make them agree" in err


def test_a_small_run_served_from_the_cache_builds_no_encoder(tmp_path, builds):
    """Too few images to probe: the defaults, not remembered. A second such run finds its features under the same
    default settings without building the encoder (nothing may ask for its modules first)."""
    write_medmnist_npz(tmp_path / "data" / "breastmnist.npz", n_classes=2)  # 30 train, 20 test images
    args = ["--backend", "auto", "--threads", "0", "--batch-size", "0"]  # overrides EXTRACTION: nothing fixed
    code, stdout, err = _run(tmp_path, tmp_path / "data", "prototype", *args)
    assert code == 0, err
    assert "defaults, not probed" in " ".join(stdout.split()) and builds == ["cpu"]
    code, _, err = _run(tmp_path, tmp_path / "data", "prototype", *args, "--force")
    assert code == 0, err
    assert builds == ["cpu"]  # served from the cache: not built
