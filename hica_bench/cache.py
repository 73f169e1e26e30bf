"""Content-addressed feature cache: one ``.npy`` + one ``.json`` per key, written atomically.

The key is a sha256 over everything that determines the features (encoder identity with its weights
digest, dataset identity, split, preprocessing, precision). The JSON holds the sha256 of the ``.npy``
bytes, its shape and dtype; an entry whose file does not match is reported, deleted and recomputed,
never trusted. The JSON is written last, so a process killed mid-write leaves at most an orphan
temporary file, never an entry that reads as valid; the next ``put`` of that key deletes the orphans of
writers that are no longer running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


class FeatureCache:
    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "features"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.rejected = 0  #: corrupt or stale entries found and discarded

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def get(self, key: str) -> np.ndarray | None:
        array_path, meta_path = self._paths(key)
        if not meta_path.exists():
            self.misses += 1
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if _sha256_file(array_path) != meta["sha256"]:
                raise ValueError("content digest differs")
            array = np.load(array_path, allow_pickle=False)
            if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
                raise ValueError("shape or dtype differs")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
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
        for orphan in self.dir.glob(f".{key}.*.tmp"):  # ".{key}.npy.{pid}.tmp", see _atomic_write
            pid = orphan.name.split(".")[-2]
            if pid.isdigit() and not _running(int(pid)):
                orphan.unlink(missing_ok=True)
        array = np.ascontiguousarray(array)
        _atomic_write(array_path, lambda handle: np.save(handle, array, allow_pickle=False))
        meta = {"sha256": _sha256_file(array_path), "shape": list(array.shape), "dtype": str(array.dtype), "parts": parts}
        _atomic_write(meta_path, lambda handle: handle.write(json.dumps(meta, indent=1, default=str).encode()))
