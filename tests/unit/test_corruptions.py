"""The robustness track (issue 20): MedMNIST-C's corruptions on the test split, on real MedMNIST images.

Where an interpreter with the ``medmnistc`` package is given (``HICA_BENCH_MEDMNISTC_PYTHON``; it cannot be installed
beside this project's stack, see :mod:`hica_bench.corruptions`), each reproduced corruption is compared with the
package's output on the same images (tests/system/test_corruptions_system.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hica_bench import corruptions as C
from hica_bench.data import split_identity
from hica_bench.errors import UserError
from hica_bench.extraction.cache import FeatureCache
from hica_bench.registry import load_registry

REGISTRY = load_registry()


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    root = Path(os.environ.get("HICA_BENCH_DATA", Path(__file__).parents[3] / "shared" / "data" / "medmnist"))
    out = {}
    for name in ("breastmnist", "pneumoniamnist"):
        with np.load(root / f"{name}.npz") as npz:
            out[name] = npz["test_images"][:12]
    return out


def test_each_corruption_changes_the_image_more_at_each_severity(real):
    """Every corruption of the BreastMNIST, PneumoniaMNIST and generic sets, on real images at 224 px (the generic set
    also on RGB): the mean absolute change grows strictly with the severity, and shapes and dtype are kept."""
    rgb = np.stack([real["breastmnist"], real["pneumoniamnist"], real["breastmnist"][::-1]], axis=-1)
    for set_name, images in (("breastmnist", real["breastmnist"]), ("pneumoniamnist", real["pneumoniamnist"]),
                             ("generic", real["pneumoniamnist"]), ("generic", rgb)):
        clean = C.to_size(images).astype(float)
        for name, params in C.SETS[set_name].items():
            changes = []
            for severity in C.SEVERITIES:
                out = C.CorruptedImages(images, C.OPERATIONS[name], params[severity - 1], name, severity)[:]
                assert out.shape == clean.shape and out.dtype == np.uint8, (set_name, name)
                changes.append(np.abs(out - clean).mean())
            assert all(a < b for a, b in zip(changes, changes[1:])), (set_name, name, images.ndim, changes)
            assert changes[0] > 0, (set_name, name)


def test_corrupted_images_are_deterministic_per_image_whatever_the_batch(real):
    images = real["pneumoniamnist"]
    view = C.CorruptedImages(images, C.OPERATIONS["gaussian_noise"], 0.06, "gaussian_noise", 3)
    whole = view[:]
    np.testing.assert_array_equal(whole, view[:])  # the same draws every time
    np.testing.assert_array_equal(whole[5:9], view[5:9])  # and for an image wherever its batch starts
    np.testing.assert_array_equal(whole[7], view[7])
    other = C.CorruptedImages(images, C.OPERATIONS["gaussian_noise"], 0.06, "gaussian_noise", 4)[:]
    shot = C.CorruptedImages(images, C.OPERATIONS["shot_noise"], 150, "shot_noise", 3)[:]
    assert not np.array_equal(whole, other) and not np.array_equal(whole, shot)
    noise = whole.astype(float) - C.to_size(images)
    assert not np.allclose(noise[0], noise[1], atol=1)  # each image its own draw


def test_supports_stay_clean_and_each_corruption_has_its_own_cache_key(medmnist_root, tmp_path):
    """A corrupted dataset's train split is the clean one (same arrays, same content identity: its cached features are
    shared); its test split's identity, hence its feature-cache key and cell identity, differ per corruption and
    severity."""
    clean = REGISTRY.choose("dataset", "breastmnist").build(root=str(medmnist_root), size=28, download=False,
                                                            cache_dir=tmp_path)
    keys = set()
    for text in ("breastmnist:corruption=speckle_noise:severity=1", "breastmnist:corruption=speckle_noise:severity=2",
                 "breastmnist:corruption=pixelate:severity=1"):
        choice = REGISTRY.choose("dataset", text)
        assert choice.base_label == "breastmnist" and choice.label == text
        dataset = choice.build(root=str(medmnist_root), size=28, download=False, cache_dir=tmp_path)
        np.testing.assert_array_equal(dataset.split("train").images, clean.split("train").images)
        np.testing.assert_array_equal(dataset.split("test").labels, clean.split("test").labels)
        assert split_identity(dataset, "train") == clean.identity != split_identity(dataset, "test")
        keys.add(FeatureCache.key({"features": {}, "dataset": split_identity(dataset, "test"), "split": "test"}))
        assert dataset.split("test").images[:2].shape == (2, C.SIZE, C.SIZE)
    keys.add(FeatureCache.key({"features": {}, "dataset": clean.identity, "split": "test"}))
    assert len(keys) == 4


def test_a_corruption_survives_the_trip_to_a_ray_worker_and_suite_files(tmp_path):
    from hica_bench.executors import ChoiceRef
    from hica_bench.suite import load

    choice = REGISTRY.choose("dataset", "pneumoniamnist:corruption=shot_noise:severity=4")
    assert ChoiceRef.of(choice).resolve(REGISTRY) == choice and choice.corruption == ("shot_noise", 4)
    (tmp_path / "s.toml").write_text('corruptions = ["all"]\nseverities = "1,3"\n')
    suite = load(tmp_path / "s.toml")
    assert suite.corruptions == ["all"] and suite.severities == [1, 3]
    grid = C.variants([REGISTRY.choose("dataset", "breastmnist")], suite.corruptions, suite.severities)
    assert len(grid) == 1 + 2 * len(C.SETS["breastmnist"]) and grid[0].corruption is None
    with pytest.raises(UserError, match="severity must be 1 to 5"):
        C.variants(grid[:1], ["all"], [0])


def test_the_probe_budget_counts_a_shared_train_split_once(medmnist_root, tmp_path):
    """The settings probe is budgeted by what the grid will encode: the clean train split once (its corrupted copies
    share it), and the clean test split plus each corrupted one."""
    from hica_bench import cell, plan

    choices = C.variants([REGISTRY.choose("dataset", "breastmnist")], ["pixelate"], [1, 2])
    grid = plan.Grid(datasets=choices, methods=[REGISTRY.choose("method", "prototype")],
                     encoders=[REGISTRY.choose("encoder", "effnet-lite0-minilm")], shots=[1], seeds=[0])
    datasets = {c.label: c.build(root=str(medmnist_root), size=28, download=False, cache_dir=tmp_path) for c in choices}
    needs = {"prototype": cell.method_needs(grid.methods[0])}
    work = plan.work(grid, datasets, needs)
    assert work.count == 546 + 3 * 156


def test_rbe_leaves_out_and_names_the_terms_whose_alexnet_excess_is_at_most_the_floor():
    """PneumoniaMNIST: AlexNet's excess errors on contrast_up (-0.0056) and gamma_corr_up (-0.0048) are below the floor,
    so their rBE terms (which would flip sign) are left out and named; BE keeps every corruption. By hand, with a clean
    error of 0.10 and errors 0.20 (pixelate), 0.13 (contrast_up), 0.12 (gamma_corr_up): BE = mean(0.20 / 0.22103,
    0.13 / 0.09530, 0.12 / 0.09607); rBE = (0.20 - 0.10) / (0.22103 - 0.10085) alone = 0.8321."""
    from hica_bench.corruptions import ALEXNET, RBE_FLOOR, balanced_error_scores

    a = ALEXNET["pneumoniamnist"]
    errors = {("pixelate", 1): 0.20, ("contrast_up", 1): 0.13, ("gamma_corr_up", 2): 0.12}
    be, rbe, left_out = balanced_error_scores("pneumoniamnist", 0.10, errors)
    assert left_out == ["contrast_up", "gamma_corr_up"] and RBE_FLOOR == 0.02
    assert be == pytest.approx(np.mean([0.20 / a["pixelate"], 0.13 / a["contrast_up"], 0.12 / a["gamma_corr_up"]]))
    assert rbe == pytest.approx(0.10 / (a["pixelate"] - a["clean"])) and rbe == pytest.approx(0.8321, abs=1e-4)
    _, rbe_only_left_out, named = balanced_error_scores("pneumoniamnist", 0.10, {("contrast_up", 1): 0.13})
    assert rbe_only_left_out is None and named == ["contrast_up"]
    assert balanced_error_scores("folder", 0.1, errors) == (None, None, [])
