"""The MedMNIST datasets (plugins/medmnist): the real files and files in their format, memory-mapped; malformed files
are user errors; ChestMNIST is multi-label."""

import numpy as np
import pytest

from conftest import write_medmnist_npz
from hica_bench.data import LazyNpz
from hica_bench.errors import UserError
from hica_bench.registry import load_registry


def _dataset(flag, root, tmp_path, size=28):
    return load_registry().choose("dataset", flag).build(root=str(root), size=size, download=False, cache_dir=tmp_path / "cache")


def test_real_breastmnist_split_is_memory_mapped(medmnist_root, tmp_path):
    ds = _dataset("breastmnist", medmnist_root, tmp_path)
    train, test = ds.split("train"), ds.split("test")
    assert isinstance(train.images, np.memmap) and not train.images.flags.writeable
    assert train.images.shape == (546, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [42, 114]
    assert ds.class_names == ["malignant", "normal, benign"] and ds.task == "binary-class"
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        assert np.array_equal(train.images, npz["train_images"])


@pytest.mark.parametrize("compressed", [True, False])
def test_large_224px_rgb_set_is_never_loaded_whole(tmp_path, compressed):
    path = write_medmnist_npz(tmp_path / "data" / "dermamnist_224.npz", n_classes=7, size=224, rgb=True,
                              counts=(70, 7, 14), compressed=compressed)
    lazy = LazyNpz(path, tmp_path / "cache")
    images = lazy.memmap("train_images")
    assert isinstance(images, np.memmap) and images.shape == (70, 224, 224, 3)
    with np.load(path) as npz:
        assert np.array_equal(images[5:9], npz["train_images"][5:9])
    ds = _dataset("dermamnist", tmp_path / "data", tmp_path, size=224)
    assert ds.task == "multi-class" and len(ds.class_names) == 7 and isinstance(ds.split("test").images, np.memmap)


def _corrupt(tmp_path, **change):
    path = write_medmnist_npz(tmp_path / "src.npz", n_classes=2)
    with np.load(path) as npz:
        arrays = dict(npz)
    for key, value in change.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    (tmp_path / "data").mkdir()
    np.savez_compressed(tmp_path / "data" / "breastmnist.npz", **arrays)
    return tmp_path / "data"


@pytest.mark.parametrize("change, message", [
    ({"test_labels": None}, "lacks the arrays test_labels"),
    ({"train_images": np.zeros((30, 28, 28), np.float32)}, "dtype float32"),
    ({"train_labels": np.zeros((29, 1), np.uint8)}, "30 images but 29 labels"),
    ({"train_labels": np.full((30, 1), 7, np.uint8)}, "outside 0..1"),
    ({"train_images": np.zeros((30, 64, 64), np.uint8)}, "expected \\(N, 28, 28\\)"),
])
def test_malformed_files_are_user_errors(tmp_path, change, message):
    root = _corrupt(tmp_path, **change)
    with pytest.raises(UserError, match=message):
        dataset = _dataset("breastmnist", root, tmp_path)
        for split in ("train", "val", "test"):
            dataset.split(split)


def test_truncated_file_is_a_user_error(tmp_path):
    path = write_medmnist_npz(tmp_path / "data" / "breastmnist.npz", n_classes=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="breastmnist.npz"):
        _dataset("breastmnist", tmp_path / "data", tmp_path).split("train")


def test_chestmnist_in_its_exact_format_is_a_multilabel_dataset(tmp_path):
    """ChestMNIST's format: uint8 images (N, 28, 28), uint8 labels (N, 14) in {0, 1}: read as a multi-label dataset
    with medmnist's 14 finding names; labels of another width are one line."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 5), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.2).astype(np.uint8)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "chestmnist.npz", **arrays)
    ds = _dataset("chestmnist", tmp_path / "data", tmp_path)
    assert ds.task == "multi-label" and len(ds.class_names) == 14 and ds.class_names[2] == "effusion"
    labels = ds.split("train").labels
    assert labels.shape == (20, 14) and labels.dtype == np.int64 and np.array_equal(labels, arrays["train_labels"])
    arrays["val_labels"] = arrays["val_labels"][:, :13]
    np.savez(tmp_path / "data" / "chestmnist.npz", **arrays)
    with pytest.raises(UserError, match=r"expected integers \(N, 14\)"):
        _dataset("chestmnist", tmp_path / "data", tmp_path / "other").split("val")
