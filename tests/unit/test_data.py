"""Images to encoder input, and the feature cache's integrity check (split from plugins/medmnist/tests/test_medmnist.py)."""

import numpy as np
import pytest

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


def _broadcast_normalisation(images, spec):
    """Preprocessing as it was written before the per-channel normalisation and the kept buffers (features of every
    committed result were computed so): resize, clamp, then (x - mean) / std with (1, 3, 1, 1) constants broadcast."""
    import torch
    import torch.nn.functional as F

    batch = torch.from_numpy(np.array(images, copy=True)).float()
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    if batch.shape[-1] != spec.size or batch.shape[-2] != spec.size:
        batch = F.interpolate(batch, size=(spec.size, spec.size), mode=spec.interpolation, antialias=True,
                              align_corners=False).clamp_(0.0, 255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
    return ((batch - mean) / std).contiguous()


@pytest.mark.parametrize("resize", ["as chosen", "kernel only", "F.interpolate"])
def test_preprocess_gives_the_same_bits_as_the_broadcast_normalisation_with_and_without_kept_buffers(resize,
                                                                                                    monkeypatch):
    """Cell ids and cached features rest on these bits: grey and RGB, equal and unequal channel constants (CLIP's),
    bicubic and bilinear, a resize and none, a batch's shorter last slice into kept buffers; the resize as chosen
    (the products for small images, data.py), by torch's kernel alone, and through F.interpolate (a torch without
    the kernel's name)."""
    from hica_bench import data

    if resize == "kernel only":
        monkeypatch.setattr(data, "PRODUCTS_MAX_SIDE", 0)
    elif resize == "F.interpolate":
        monkeypatch.setattr(data, "RESIZE_KERNELS", {})
    rng = np.random.default_rng(0)
    specs = [InputSpec(224, (0.5,) * 3, (0.5,) * 3, "bicubic"),
             InputSpec(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic"),
             InputSpec(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),
             InputSpec(28, (0.5,) * 3, (0.5,) * 3, "bilinear")]
    for spec in specs:
        for shape in ((21, 28, 28), (21, 28, 28, 3), (5, 64, 64), (3, 65, 65, 3)):  # 65 px: past the products' limit
            images = rng.integers(0, 256, shape, dtype=np.uint8)
            buffers = {}
            for start in range(0, len(images), 8):  # 8, 8, then 5 into the same buffers
                expected = _broadcast_normalisation(images[start:start + 8], spec)
                assert preprocess(images[start:start + 8], spec).equal(expected)
                kept = preprocess(images[start:start + 8], spec, buffers=buffers)
                assert kept.equal(expected) and kept.is_contiguous()
            assert buffers["out"].shape[0] == min(8, len(images))


def test_small_images_are_resized_as_matrix_products_of_the_kernels_weights_with_its_bits():
    """The products path (weights read off torch's kernel, checked per shape) runs for MedMNIST's 28 and 64 px images
    where this machine's matrix library adds in the kernel's order, and the check says yes exactly when the products
    give the kernel's bits: also where they do not (downsampling 512 -> 224 px adds many more products)."""
    import torch

    from hica_bench.data import PRODUCTS_MAX_SIDE, products_match, resize_by_products, resize_weights

    threads = torch.get_num_threads()
    for kernel, taps in (("_upsample_bicubic2d_aa", 4), ("_upsample_bilinear2d_aa", 2)):
        weights = resize_weights(kernel, 28, 224, False)
        assert weights.shape == (224, 28) and torch.allclose(weights.sum(1), torch.ones(224))
        assert 2 <= int((weights != 0).sum(1).max()) <= taps  # the kernel's support, not a dense or empty row
        assert torch.equal(resize_weights(kernel, 28, 224, True), weights.T)
        if not products_match(kernel, (8, 1, 28, 28), (224, 224), threads):
            pytest.skip("this machine's matrix library adds the products in another order than torch's kernel, so "
                        "the kernel runs (the same bits, slower): nothing of the products path to test here")
        for shape in ((8, 1, 28, 28), (5, 3, 28, 28), (1, 1, PRODUCTS_MAX_SIDE, PRODUCTS_MAX_SIDE)):
            assert products_match(kernel, shape, (224, 224), threads), (kernel, shape)
    kernel, shape = "_upsample_bicubic2d_aa", (2, 1, 512, 512)
    sample = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1)).float()
    expected = getattr(torch._C._nn, kernel)(sample, (224, 224), False, None, None)
    got = resize_by_products(kernel, sample, (224, 224), torch.empty(2, 1, 512, 224), torch.empty_like(expected))
    assert products_match(kernel, shape, (224, 224), threads) == torch.equal(got, expected)
