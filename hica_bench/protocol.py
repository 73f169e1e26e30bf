"""The k-shot protocol: which train images form the support set of a (dataset, k, seed) cell.

Sampling rule (platform- and library-version-independent, so a seed names the same images everywhere):
every train index ``i`` of class ``c`` gets the key ``sha256(f"{dataset}|{seed}|{i}")``; the support set
of class ``c`` is its ``k`` indices with the smallest keys. Consequences: the same seed gives the same
indices on every machine and numpy version, and supports are nested (the 1-shot support of a seed is
inside its 5-shot support, which is inside its 20-shot support), so shot curves are not confounded by
resampling. The result's ``support_hash`` is sha256 over the sorted indices.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hica_bench.errors import UserError


def _key(dataset: str, seed: int, index: int) -> bytes:
    return hashlib.sha256(f"{dataset}|{seed}|{index}".encode()).digest()


def check_shots(shots: list[int], labels: np.ndarray, n_classes: int, dataset: str) -> None:
    """Raise a :class:`UserError` for k < 1 or k larger than the smallest train class."""
    counts = np.bincount(labels, minlength=n_classes)
    smallest = int(counts.min())
    for k in shots:
        if k < 1:
            raise UserError(f"shots must be >= 1, got {k}")
        if k > smallest:
            raise UserError(
                f"{k} shots is more than {dataset}'s smallest train class has "
                f"({smallest} images of class {int(counts.argmin())}); use --shots up to {smallest}"
            )


def sample_support(labels: np.ndarray, n_classes: int, k: int, seed: int, dataset: str) -> np.ndarray:
    """Indices (k * n_classes,) into the train split, sorted by class then by index."""
    check_shots([k], labels, n_classes, dataset)
    chosen = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        ranked = sorted(members.tolist(), key=lambda i: _key(dataset, seed, i))
        chosen.append(np.sort(np.asarray(ranked[:k], dtype=np.int64)))
    return np.concatenate(chosen)


def support_hash(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices, dtype="<i8")).tobytes()).hexdigest()
