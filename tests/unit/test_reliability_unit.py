"""Reliability (issue 7) in this process: the plugin allow-list from the environment, and files that carry a pickle are
refused, never unpickled (split from tests/system/test_reliability.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_PLUGINS
from hica_bench.extraction.cache import FeatureCache
from test_reliability import broken_distribution


def test_allow_list_from_the_environment(monkeypatch, tmp_path):
    from hica_bench.registry import load_registry

    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    monkeypatch.syspath_prepend(str(broken_distribution(tmp_path / "site")))
    everything = load_registry()
    everything.specs("method")
    assert [e for e in everything.load_errors if "hica-bench-broken" in e] and "linear-probe" in everything.specs("method")
    assert "still-here" in everything.specs("loss")  # the broken hook's distribution keeps its working hook
    monkeypatch.setenv("HICA_BENCH_PLUGINS", "hica_bench.Medmnist")  # normalised as pip does
    only = load_registry()
    assert {r.distribution for r in only.all()} == {"hica-bench-medmnist"} and only.load_errors == []


class Payload:
    """Unpickling this creates ``path``: proof that a file was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_untrusted_files_are_never_unpickled(tmp_path):
    """A checkpoint, a feature-cache entry and a dataset file carrying a pickle are refused, never executed."""
    import hashlib

    import torch

    from hica_bench.data import LazyNpz
    from hica_bench.errors import UserError
    from hica_bench.registry import load_registry

    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": Payload(marker)}}, checkpoint)
    with pytest.raises(UserError, match="cannot read weights from"):
        load_registry().choose("encoder", f"timm:model=resnet18:checkpoint={checkpoint}:text=").build(device="cpu")

    cache = FeatureCache(tmp_path / "cache")
    key = cache.key({"encoder": "evil"})
    array_path = cache.dir / f"{key}.npy"
    np.save(array_path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    digest = hashlib.sha256(array_path.read_bytes()).hexdigest()
    (cache.dir / f"{key}.json").write_text(json.dumps({"sha256": digest, "shape": [1], "dtype": "object"}))
    assert cache.get(key) is None and cache.rejected == 1  # reported as corrupt, deleted, to be recomputed

    npz = tmp_path / "evil.npz"
    np.savez_compressed(npz, train_labels=np.array([Payload(marker)], dtype=object))
    with pytest.raises(UserError, match="unreadable"):
        LazyNpz(npz, tmp_path / "scratch").load("train_labels")
    with pytest.raises(UserError, match="not a valid .npy array"):
        LazyNpz(npz, tmp_path / "scratch").memmap("train_labels")
    assert not marker.exists()
