"""Frozen-encoder features of a whole split, computed once and served from the feature cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hica_bench.cache import FeatureCache
from hica_bench.data import preprocess, preprocessing_id
from hica_bench.interfaces import FewShotDataset, ImageEncoder


@dataclass
class Extraction:
    """How one split's features were obtained (reported in the run summary)."""

    dataset: str
    split: str
    n_images: int
    cached: bool
    seconds: float

    @property
    def images_per_second(self) -> float | None:
        return None if self.cached or self.seconds <= 0 else self.n_images / self.seconds


def precision(device: str, amp: bool) -> str:
    """The compute precision used by :func:`encode_images` (part of the cache key)."""
    if not amp or not device.startswith("cuda"):
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def encode_images(
    images: np.ndarray,
    encoder: ImageEncoder,
    device: str,
    batch_size: int,
    amp: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, H, W[, 3]) uint8, possibly memory-mapped -> (N, D) float32, reading ``batch_size`` images at a time."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(device, amp))
    out = np.empty((len(images), encoder.embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = preprocess(images[start : start + batch_size], encoder.input_spec, device)
            if dtype is not None:
                with torch.autocast("cuda", dtype=dtype):
                    features = encoder.encode(batch)
            else:
                features = encoder.encode(batch)
            out[start : start + len(batch)] = features.float().cpu().numpy()
            if on_batch:
                on_batch(len(batch))
    return out


def split_features(
    cache: FeatureCache,
    dataset: FewShotDataset,
    split: str,
    encoder: ImageEncoder,
    device: str,
    batch_size: int,
    amp: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, Extraction]:
    """Features of ``dataset.split(split)``: from the cache when a valid entry exists, else computed and stored."""
    parts = {
        "encoder": encoder.identity,
        "dataset": dataset.identity,
        "split": split,
        "preprocessing": preprocessing_id(encoder.input_spec),
        "precision": precision(device, amp),
    }
    key = cache.key(parts)
    cached = cache.get(key)
    if cached is not None:
        return cached, Extraction(dataset.name, split, len(cached), True, 0.0)
    images = dataset.split(split).images
    start = time.perf_counter()
    features = encode_images(images, encoder, device, batch_size, amp, on_batch)
    seconds = time.perf_counter() - start
    cache.put(key, features, parts)
    return features, Extraction(dataset.name, split, len(features), False, seconds)
