"""Cross-dataset transfer: cells fitted on one dataset's images and scored on another's test split.

A protocol with a ``support_from`` (the ``cross-dataset`` protocol: :mod:`hica_bench.interfaces`, ``EvaluationProtocol``)
runs each of the grid's datasets (the *target*) on a :class:`TransferDataset`: the target's classes and test split, the
source's train and val splits with their labels renamed to the target's classes (:func:`hica_bench.protocol.match_classes`:
by name or by a mapping file; a source image of a class no target class maps to is labelled -1 and never drawn). The
supports are drawn by the source's name, so a seed names the same images as the source's own few-shot cells (the
in-domain diagonal and the transfer cells are paired), and the feature cache keys each split by its own content (the
source's train features are the ones its own cells use). Hand-written: no library wraps two datasets this way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hica_bench.data import split_identity
from hica_bench.interfaces import Split


def transfer_label(source: str, target: str) -> str:
    """How a transfer's cells are shown while they run (source -> target)."""
    return f"{source}->{target}"


class TransferDataset:
    """``target``'s classes, task and test split; ``source``'s train and val splits, labelled in the target's classes
    (``class_map[c]``: the source class of target class ``c``; other source images: -1)."""

    def __init__(self, source: Any, target: Any, class_map: np.ndarray, source_label: str, target_label: str) -> None:
        self.source, self.target = source, target
        self.class_map = np.asarray(class_map, dtype=np.int64)
        self.source_label, self.target_label = source_label, target_label
        self.name, self.size, self.task = target.name, target.size, target.task
        self.class_names = list(target.class_names)
        self.draw_name = source.name  #: the supports are the source's own (same seed, same images)
        self.volumetric = bool(getattr(target, "volumetric", False))
        self.identity = (f"{target.identity}|support-from:{source.identity}|classes:"
                         f"{','.join(map(str, self.class_map.tolist()))}")
        self._position = np.full(len(source.class_names), -1, dtype=np.int64)
        self._position[self.class_map] = np.arange(len(self.class_map))
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        if name == "test":
            return self.target.split("test")
        if name not in self._splits:
            split = self.source.split(name)
            labels = np.asarray(split.labels, dtype=np.int64)
            # multi-label: the matched labels' columns, in the target's order; else each image's class renamed
            self._splits[name] = Split(split.images, labels[:, self.class_map] if labels.ndim == 2 else self._position[labels])
        return self._splits[name]

    def split_identity(self, name: str) -> str:
        """Each split's content: the target's test split, the source's train and val splits."""
        return split_identity(self.target, "test") if name == "test" else split_identity(self.source, name)

    def describe(self) -> Any:
        """A corrupted target's corruption (what its results record)."""
        return self.target.describe()
