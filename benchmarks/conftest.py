"""Fixtures of the pytest-benchmark suite: real MedMNIST files, the default encoder, a warm feature cache.

Not part of the default test run (``testpaths = ["tests"]``); run it with ``python -m pytest benchmarks``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENCODER = "effnet-lite0-minilm"


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    for candidate in (os.environ.get("HICA_BENCH_DATA"), REPO.parent / "shared" / "data" / "medmnist"):
        if candidate and (Path(candidate) / "breastmnist.npz").exists():
            return Path(candidate)
    pytest.skip("real MedMNIST files not found (set HICA_BENCH_DATA to a folder with breastmnist.npz)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """``$HICA_BENCH_CACHE`` when set (warm features make the grid benchmark cheap), else a fresh folder."""
    value = os.environ.get("HICA_BENCH_CACHE")
    return Path(value) if value else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def registry():
    from hica_bench.registry import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def breastmnist(registry, medmnist_root, cache_dir):
    return registry.choose("dataset", "breastmnist").build(root=str(medmnist_root), size=28, download=False, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def pneumonia_labels(registry, medmnist_root, cache_dir) -> np.ndarray:
    dataset = registry.choose("dataset", "pneumoniamnist").build(root=str(medmnist_root), size=28, download=False, cache_dir=cache_dir)
    return dataset.split("train").labels


@pytest.fixture(scope="session")
def encoders(registry):
    """The default encoder pair on CPU, built once."""
    return registry.choose("encoder", DEFAULT_ENCODER).build(device="cpu")
