"""Content-addressed feature cache: one ``.npy`` + one ``.json`` per key, each written atomically.

The key is :func:`hica_bench.files.digest` over everything that determines the features (the
:class:`~hica_bench.extraction.FeatureIdentity`, the dataset identity and the split). The JSON holds the sha256
of the ``.npy`` bytes, its shape and dtype; an entry whose file does not match is reported, deleted and
recomputed, never trusted. The JSON is written last, so a process killed mid-write leaves at most an orphan
temporary file, never an entry that reads as valid; the next ``put`` of that key deletes the orphans of writers
that are no longer running.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hica_bench.files import atomic_write, cannot_write, digest, file_lock, file_sha256, remove_orphans

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class FeatureCache:
    def __init__(self, root: Path, kind: str = "features") -> None:
        """Entries in ``root/kind``: ``features`` (image features), ``texts`` (:mod:`hica_bench.extraction.texts`)."""
        self.dir = Path(root) / kind
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission, a full disk
            raise cannot_write(self.dir, exc) from None
        self.hits = 0
        self.misses = 0
        self.rejected = 0  #: corrupt or stale entries found and discarded

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return digest({"format": FORMAT_VERSION, **parts})

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def get(self, key: str, count_miss: bool = True) -> np.ndarray | None:
        """The entry of ``key``, or None (a miss, counted unless ``count_miss`` is false: a look that may fall back)."""
        array_path, meta_path = self._paths(key)
        if not meta_path.exists():
            self.misses += count_miss
            return None
        return self._read(key, array_path, meta_path)

    @contextlib.contextmanager
    def computing(self, key: str):
        """While computing ``key``'s entry: holds its lock, so a second process needing the same features (runs sharing
        a ``--cache-dir``) waits and then reads them instead of computing them too. Yields the entry when another
        process wrote it meanwhile (counted as a hit, not the miss :meth:`get` counted), else None."""
        locks = self.dir.parent / "locks"
        try:
            locks.mkdir(exist_ok=True)
        except OSError as exc:
            raise cannot_write(locks, exc) from None
        with file_lock(locks / f"{key}.lock"):
            array_path, meta_path = self._paths(key)
            found = self._read(key, array_path, meta_path) if meta_path.exists() else None
            if found is not None:
                self.misses -= 1
            yield found

    def _read(self, key: str, array_path: Path, meta_path: Path) -> np.ndarray | None:
        try:
            meta = json.loads(meta_path.read_text())
            if file_sha256(array_path, on_disk=False) != meta["sha256"]:
                raise ValueError("content digest differs")
            array = np.load(array_path, allow_pickle=False)
            if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
                raise ValueError("shape or dtype differs")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: an entry that is not a JSON object
            log.warning("feature cache entry %s is corrupt (%s); recomputing", key[:12], exc)
            self.rejected += 1
            self.misses += 1
            meta_path.unlink(missing_ok=True)
            array_path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return array

    def put(self, key: str, array: np.ndarray, parts: dict[str, Any]) -> None:
        array_path, meta_path = self._paths(key)
        for path in (array_path, meta_path):
            remove_orphans(self.dir, path.name)
        array = np.ascontiguousarray(array)
        atomic_write(array_path, lambda handle: np.save(handle, array, allow_pickle=False))
        meta = {"sha256": file_sha256(array_path, on_disk=False), "shape": list(array.shape), "dtype": str(array.dtype), "parts": parts}
        atomic_write(meta_path, json.dumps(meta, indent=1, default=str))
