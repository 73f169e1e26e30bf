"""3D volumes (issue 22) in the library: the 3D flags are volumetric datasets, memory-mapped, and slices are encoded
through the 2D path and pooled per volume (split from tests/cli/test_volumes.py, whose files it uses)."""

from __future__ import annotations

import numpy as np
import pytest

from hica_bench import testing, volumes
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
