"""Images to encoder input, and the feature cache's integrity check (split from plugins/medmnist/tests/test_medmnist.py)."""

import numpy as np

from hica_bench.data import preprocess
from hica_bench.extraction.cache import FeatureCache
from hica_bench.interfaces import InputSpec


def test_preprocess_grey_and_rgb_to_encoder_input():
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    grey = np.full((2, 28, 28), 255, np.uint8)
    out = preprocess(grey, spec)
    assert tuple(out.shape) == (2, 3, 32, 32)
    assert np.allclose(out.numpy(), 2.0, atol=1e-4)  # (1 - 0.5) / 0.25
    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[..., 1] = 255
    out = preprocess(rgb, spec).numpy()
    assert np.allclose(out[0, 0], -2.0) and np.allclose(out[0, 1], 2.0)


def test_feature_cache_detects_corruption(tmp_path):
    cache = FeatureCache(tmp_path)
    key = cache.key({"encoder": "e", "split": "train"})
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put(key, features, {"encoder": "e"})
    assert np.array_equal(cache.get(key), features) and cache.hits == 1
    npy = tmp_path / "features" / f"{key}.npy"
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    assert cache.get(key) is None and cache.rejected == 1
    assert cache.get(key) is None and cache.misses == 2  # the corrupt entry was removed
    assert cache.key({"encoder": "e", "split": "train"}) != cache.key({"encoder": "e", "split": "test"})
