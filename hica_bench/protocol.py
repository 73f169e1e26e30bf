"""The sampling rules the protocols draw with: which train images form the support set of a (dataset, k, seed) cell,
and which images form its validation set.

Sampling rule (platform- and library-version-independent, so a seed names the same images everywhere):
every train index ``i`` of class ``c`` gets the key ``sha256(f"{dataset}|{seed}|{i}")``; the support set
of class ``c`` is its ``k`` indices with the smallest keys. Consequences: the same seed gives the same
indices on every machine and numpy version, and supports are nested (the 1-shot support of a seed is
inside its 5-shot support, which is inside its 20-shot support), so shot curves are not confounded by
resampling. :func:`support_hash` (sha256 over the sorted indices) is part of each result's identity.

Validation rule (:func:`sample_validation`, Dassl's few-shot validation: ``m = min(k, 4)`` images per class unless
the protocol says otherwise): from the dataset's val split when every class has at least ``cap`` images there (``cap``
= 4, or the protocol's fixed ``m``): class ``c``'s ``m`` val indices with the smallest keys
``sha256(f"{dataset}|val|{seed}|{i}")``; otherwise from the train split: class ``c``'s ``m`` train indices with the
*largest* support keys, which no support of that class can reach while ``k + m`` is at most the class's size. Either
way the validation set never overlaps the support, is nested across k (``m`` grows with k, the order is fixed) and
is the same on every machine.

Multi-label datasets (labels (N, L) in {0, 1}: ChestMNIST's 14 findings) are drawn by the per-label k-shot rule of the
multi-label few-shot literature (every label gets at least k positive support images; cf. the "minimum-including"
rule of Hou et al., ACL 2020), with the k negatives each label's one-vs-rest classifier needs: the support is the union
over labels of each label's ``k`` positive and ``k`` negative train indices with the smallest keys (the same keys as
above). An image positive for several labels counts for each, so frequent labels get more than k positives; the
pruning step of Hou et al. (dropping images whose removal keeps every label at k) is left out because it would break
nesting across k. Validation sets are drawn the same way from the val split (each label's ``m`` positive and ``m``
negative val indices with the smallest val keys), never from train.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

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


def multilabel(labels: np.ndarray) -> bool:
    """Whether ``labels`` are a multi-label dataset's, (N, L) in {0, 1}."""
    return np.asarray(labels).ndim == 2


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Images per class 0..n_classes-1 (multi-label: the fewer of each label's positive and negative images); a negative
    label (an image of no class the cell knows: under ``cross-dataset`` a source class no target class maps to) counts
    for none."""
    labels = np.asarray(labels, dtype=np.int64)
    if multilabel(labels):
        positives = labels.sum(axis=0)[:n_classes] if len(labels) else np.zeros(n_classes, int)
        return np.minimum(positives, len(labels) - positives)
    return np.bincount(labels[labels >= 0], minlength=n_classes)[:n_classes] if len(labels) else np.zeros(n_classes, int)


def check_shots(shots: list[int], labels: np.ndarray, n_classes: int, dataset: str,
                class_names: list[str] | None = None) -> None:
    """Raise a :class:`UserError` for k < 1 or k larger than the smallest train class."""
    _at_least_one_shot(shots)
    counts = class_counts(labels, n_classes)
    smallest, which = int(counts.min()), int(counts.argmin())
    named = f" ({class_names[which]})" if class_names is not None else ""
    for k in shots:
        if k > smallest and multilabel(labels):
            raise UserError(f"{k} shots is more than {dataset}'s train split has positive or negative images of label "
                            f"{which}{named} ({smallest}); use --shots up to {smallest}")
        if k > smallest:
            raise UserError(
                f"{k} shots is more than {dataset}'s smallest train class has "
                f"({smallest} images of class {which}{named}); use --shots up to {smallest}"
            )


def sample_support(labels: np.ndarray, n_classes: int, k: int, seed: int, dataset: str,
                   classes: Sequence[int] | None = None) -> np.ndarray:
    """Indices (k * n_classes,) into the train split, sorted by class then by index; with ``classes``, those classes'
    only (each class's k images are the same as in the support of every class)."""
    check_shots([k], labels, n_classes, dataset)
    if multilabel(labels):  # the union of each label's k positives (module docstring), in index order
        if classes is not None:
            raise UserError(f"{dataset} is multi-label: its supports cover every label")
        return np.asarray(sorted(_per_label_union(labels, k, lambda i: _key(dataset, seed, i))), dtype=np.int64)
    chosen = []
    for c in (range(n_classes) if classes is None else classes):
        members = np.flatnonzero(labels == c)
        ranked = sorted(members.tolist(), key=lambda i: _key(dataset, seed, i))
        chosen.append(np.sort(np.asarray(ranked[:k], dtype=np.int64)))
    return np.concatenate(chosen)


def _per_label_union(labels: np.ndarray, k: int, key) -> set[int]:
    """Each label's k positive and k negative indices with the smallest keys, their union."""
    chosen: set[int] = set()
    for c in range(labels.shape[1]):
        for side in (1, 0):
            chosen.update(sorted(np.flatnonzero(labels[:, c] == side).tolist(), key=key)[:k])
    return chosen


def support_hash(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices, dtype="<i8")).tobytes()).hexdigest()


#: Dassl's few-shot validation size: min(k, VALIDATION_CAP) images per class.
VALIDATION_CAP = 4


def validation_size(k: int, per_class: int = 0) -> int:
    """Images per class in a k-shot cell's validation set: ``per_class`` when fixed (> 0), else min(k, 4)."""
    return per_class if per_class > 0 else min(k, VALIDATION_CAP)


def validation_source(val_labels: np.ndarray, n_classes: int, per_class: int = 0, source: str = "auto") -> str:
    """Where the validation sets of a dataset come from: ``"val"`` when its val split has at least ``cap`` images of
    every class (``cap``: ``per_class`` when fixed, else :data:`VALIDATION_CAP`; ``source="auto"``), else
    ``"train"``; ``source`` ``"val"`` or ``"train"`` forces one (checked by :func:`check_validation`)."""
    if source != "auto":
        return source
    counts = class_counts(val_labels, n_classes)
    return "val" if counts.min() >= (per_class if per_class > 0 else VALIDATION_CAP) else "train"


def check_validation(shots: list[int], labels: dict[str, np.ndarray], n_classes: int, dataset: str,
                     per_class: int = 0, source: str = "auto", class_names: list[str] | None = None) -> None:
    """A :class:`UserError` when a shot count leaves no room for its validation set: beyond the val split's smallest
    class, or (from train) when ``k + m`` is more than the smallest train class."""
    where = validation_source(labels["val"], n_classes, per_class, source)
    if where == "train" and multilabel(labels["train"]):
        raise UserError(f"{dataset} is multi-label: its validation sets come from the val split, which has too few "
                        f"positive images of some label for {validation_size(max(shots), per_class)} per label")
    counts = class_counts(labels[where], n_classes)
    smallest, which = int(counts.min()), int(counts.argmin())
    named = f" ({class_names[which]})" if class_names is not None else ""
    for k in shots:
        m = validation_size(k, per_class)
        need = m if where == "val" else k + m
        if need > smallest:
            shown = f"{m} validation images per class" if where == "val" else f"{k} shots + {m} validation images per class"
            raise UserError(f"{shown} is more than {dataset}'s {where} split has for class {which}{named} ({smallest} "
                            f"images): k is beyond the validation pool; use fewer shots or a smaller per_class")


def sample_validation(labels: dict[str, np.ndarray], n_classes: int, k: int, seed: int, dataset: str,
                      per_class: int = 0, source: str = "auto") -> tuple[str, np.ndarray]:
    """(split, indices) of the validation set of a (dataset, k, seed) cell, sorted by class then index (the rule is in
    the module docstring); it never overlaps :func:`sample_support`'s set for the same (dataset, k, seed)."""
    where = validation_source(labels["val"], n_classes, per_class, source)
    check_validation([k], labels, n_classes, dataset, per_class, source)
    m = validation_size(k, per_class)
    pool = np.asarray(labels[where], dtype=np.int64)
    if multilabel(pool):  # each label's m positive val images with the smallest val keys, their union
        return where, np.asarray(sorted(_per_label_union(pool, m, lambda i: _key(f"{dataset}|val", seed, i))),
                                 dtype=np.int64)
    chosen = []
    for c in range(n_classes):
        members = np.flatnonzero(pool == c).tolist()
        if where == "val":
            ranked = sorted(members, key=lambda i: _key(f"{dataset}|val", seed, i))[:m]
        else:  # the far end of the support ranking: out of every support's reach while k + m <= class size
            ranked = sorted(members, key=lambda i: _key(dataset, seed, i))[-m:]
        chosen.append(np.sort(np.asarray(ranked, dtype=np.int64)))
    return where, np.concatenate(chosen)


def class_split(n_classes: int, rule: str = "first-half", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(base, novel) class indices: CoCoOp's rule (``first-half``: the first ceil(C / 2) class indices are base, as in
    Dassl's ``subsample_classes``), or ``seeded``: the ceil(C / 2) classes with the smallest keys
    ``sha256("classes|{seed}|{c}")`` (platform-independent). Needs at least 3 classes."""
    if n_classes < 3:
        raise UserError(f"base-to-novel needs at least 3 classes (a base and a novel half); this dataset has {n_classes}")
    m = -(-n_classes // 2)
    if rule == "first-half":
        order = list(range(n_classes))
    else:
        order = sorted(range(n_classes), key=lambda c: hashlib.sha256(f"classes|{seed}|{c}".encode()).digest())
    return np.sort(np.asarray(order[:m], dtype=np.int64)), np.sort(np.asarray(order[m:], dtype=np.int64))



MAX_MAPPING_ENTRIES = 1000  #: classes a cross-dataset mapping file may map (a taxonomy far larger than any dataset's)
MAX_CLASS_NAME = 200  #: characters in one class name of a mapping file


def read_mapping(path: str) -> dict[str, str]:
    """A cross-dataset class-mapping file (JSON, YAML or TOML): one table, target class name -> source class name."""
    from hica_bench.files import read_config

    where = f"class mapping {path}"
    table = read_config(Path(path).expanduser(), where, (".json", ".yaml", ".yml", ".toml"))
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise UserError(f"{where}: must be one table of target class name = source class name (strings)")
    if len(table) > MAX_MAPPING_ENTRIES or any(len(k) > MAX_CLASS_NAME or len(v) > MAX_CLASS_NAME for k, v in table.items()):
        raise UserError(f"{where}: at most {MAX_MAPPING_ENTRIES} entries of at most {MAX_CLASS_NAME} characters each")
    return table


def _normal_name(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").casefold().split())


def match_classes(source_names: Sequence[str], target_names: Sequence[str], source: str, target: str,
                  mapping: dict[str, str] | None = None, where: str = "the mapping") -> np.ndarray:
    """For each class of ``target`` (the dataset a cross-dataset cell is scored on), the index of the class of ``source``
    (the dataset its support comes from) that is the same class: as ``mapping`` says (target class name -> source
    class name), else by name (case, spaces, ``_`` and ``-`` aside). A mapping that names none of the target's classes
    is for other targets (a grid has several): the target is matched by name. One line (UserError) for a target class
    with no source class, a mapping that names some of the target's classes and a class either dataset lacks, or two
    target classes on one source class."""
    by_name = {_normal_name(n): i for i, n in enumerate(source_names)}
    targets = {_normal_name(n): i for i, n in enumerate(target_names)}
    if not any(_normal_name(name) in targets for name in mapping or {}):
        mapping = {}  # a mapping for the grid's other datasets (e.g. the source scored on itself): matched by name
    for name, to in mapping.items():
        if _normal_name(name) not in targets:
            raise UserError(f"{where} names class {name!r}, which {target} does not have (its classes: "
                            f"{', '.join(map(repr, target_names))})")
        if _normal_name(to) not in by_name:
            raise UserError(f"{where} maps {name!r} to {to!r}, which {source} does not have (its classes: "
                            f"{', '.join(map(repr, source_names))})")
    mapped = {_normal_name(k): _normal_name(v) for k, v in mapping.items()}
    out = []
    for name in target_names:
        wanted = mapped.get(_normal_name(name), _normal_name(name))
        if wanted not in by_name:
            raise UserError(f"{target}'s class {name!r} has no class of the same name in {source} (its classes: "
                            f"{', '.join(map(repr, source_names))}); map it with mapping=FILE")
        out.append(by_name[wanted])
    twice = [source_names[c] for c in set(out) if out.count(c) > 1]
    if twice:
        raise UserError(f"{where}: two classes of {target} map to {source}'s class {twice[0]!r}; each must map to "
                        "its own class")
    return np.asarray(out, dtype=np.int64)
