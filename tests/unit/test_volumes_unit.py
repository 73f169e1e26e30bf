"""3D volumes (issue 22) in the library: the 3D flags are volumetric datasets, memory-mapped, and slices are encoded
through the 2D path and pooled per volume (split from tests/cli/test_volumes.py, whose files it uses)."""

from __future__ import annotations

import numpy as np
import pytest

from hica_bench import testing, volumes
from hica_bench.errors import UserError
from test_volumes import data3d, dataset  # noqa: F401  (data3d: a module fixture, files in the MedMNIST 3D format)


def test_3d_flags_are_volumetric_datasets_memory_mapped(data3d):
    for text, size, classes in (("adrenalmnist3d", 28, 2), ("nodulemnist3d", 64, 2)):
        built = dataset(data3d, text, size)
        testing.check_dataset(built)
        train = built.split("train").images
        assert built.volumetric and train.shape[1:] == (size,) * 3 and train.dtype == np.uint8
        assert isinstance(train, np.memmap) or isinstance(train.base, np.memmap)
        assert len(built.class_names) == classes


def _pixels(side: int = 8):
    """An exact 2D encoder for the arithmetic: its features are the preprocessed pixels themselves."""
    class Pixels:
        identity, embed_dim = f"pixels{side}", 3 * side * side
        input_spec = testing.InputSpec(side, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")

        def encode(self, x):
            return x.flatten(1)
    return Pixels()


@pytest.mark.parametrize("axis, pool", [("0", "mean"), ("1", "max"), ("2", "mean"), ("planes", "mean"),
                                        ("planes", "max")])
def test_slices_are_encoded_through_the_2d_path_and_pooled_per_volume(axis, pool, data3d):
    """encode_sliced equals encoding every slice on its own and pooling, for every axis and pooling, across chunk
    boundaries (24 volumes of 28 slices: several chunks)."""
    from hica_bench.data import preprocess

    encoder = _pixels()
    vols = dataset(data3d).split("train").images
    options = volumes.VolumeOptions(axis, pool)
    seen = []
    got = volumes.encode_sliced(vols, options, lambda flat: encoder.encode(preprocess(flat, encoder.input_spec)).numpy(),
                                on_volumes=seen.append)
    assert sum(seen) == len(vols) and len(seen) > 1  # streamed a few volumes at a time
    for i in (0, 13, len(vols) - 1):
        per_slice = [encoder.encode(preprocess(np.moveaxis(vols[i], a, 0), encoder.input_spec)).numpy()
                     for a in options.axes]
        stacked = np.concatenate(per_slice)
        expected = stacked.mean(0) if pool == "mean" else stacked.max(0)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis, step", [("0", 2), ("1", 3), ("planes", 4), ("2", 28)])
def test_every_nth_slice_is_the_middle_one_of_each_group(axis, step, data3d):
    """--slice-step N: each axis's slices N//2, N//2 + N, ... (one slice, the middle-most, when N ≥ the axis length),
    pooled as with every slice; in the feature identity only when N > 1."""
    from hica_bench.data import preprocess

    encoder = _pixels()
    vols = dataset(data3d).split("train").images
    options = volumes.VolumeOptions(axis, "mean", step)
    got = volumes.encode_sliced(vols, options, lambda flat: encoder.encode(preprocess(flat, encoder.input_spec)).numpy())
    for i in (0, len(vols) - 1):
        length = vols.shape[1]  # 28 on every axis
        indices = list(range(min(step // 2, length - 1), length, step))
        assert len(indices) == -(-(length - min(step // 2, length - 1)) // step)
        kept = [np.moveaxis(vols[i], a, 0)[indices] for a in options.axes]
        expected = np.concatenate([encoder.encode(preprocess(k, encoder.input_spec)).numpy() for k in kept]).mean(0)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
    assert options.describe().endswith(f":step={step}")
    assert volumes.VolumeOptions(axis, "mean", 1).describe() == f"slices:axis={axis}:pool=mean"  # ids as before steps
    for bad in (0, -1, volumes.MAX_STEP + 1, True, 2.0):
        with pytest.raises(UserError, match="--slice-step must be a whole number from 1"):
            volumes.VolumeOptions(axis, "mean", bad)
