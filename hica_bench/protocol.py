"""The k-shot protocol: which train images form the support set of a (dataset, k, seed) cell.

Sampling rule (platform- and library-version-independent, so a seed names the same images everywhere):
every train index ``i`` of class ``c`` gets the key ``sha256(f"{dataset}|{seed}|{i}")``; the support set
of class ``c`` is its ``k`` indices with the smallest keys. Consequences: the same seed gives the same
indices on every machine and numpy version, and supports are nested (the 1-shot support of a seed is
inside its 5-shot support, which is inside its 20-shot support), so shot curves are not confounded by
resampling. :func:`support_hash` (sha256 over the sorted indices) is part of each result's identity.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hica_bench.errors import UserError


def _key(dataset: str, seed: int, index: int) -> bytes:
    return hashlib.sha256(f"{dataset}|{seed}|{index}".encode()).digest()


#: Seeds must fit the random generators they seed (numpy's legacy seed and scikit-learn's random_state: < 2**32).
MAX_SEED = 2**32 - 1


def check_shots_and_seeds(shots: list[int], seeds: list[int]) -> None:
    """The grid's shots and seeds, before any dataset is opened: at least one of each, k >= 1, 0 <= seed <= MAX_SEED."""
    if not shots or not seeds:
        raise UserError("the grid needs at least one shot count (--shots) and one seed (--seeds)")
    _at_least_one_shot(shots)
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"--seeds must be between 0 and {MAX_SEED}, got {seed}")


def _at_least_one_shot(shots: list[int]) -> None:
    for k in shots:
        if k < 1:
            raise UserError(f"--shots must be >= 1, got {k}")


def check_shots(shots: list[int], labels: np.ndarray, n_classes: int, dataset: str,
                class_names: list[str] | None = None) -> None:
    """Raise a :class:`UserError` for k < 1 or k larger than the smallest train class."""
    _at_least_one_shot(shots)
    counts = np.bincount(labels, minlength=n_classes)
    smallest, which = int(counts.min()), int(counts.argmin())
    named = f" ({class_names[which]})" if class_names is not None else ""
    for k in shots:
        if k > smallest:
            raise UserError(
                f"{k} shots is more than {dataset}'s smallest train class has "
                f"({smallest} images of class {which}{named}); use --shots up to {smallest}"
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
