"""Text embeddings through the feature cache (:class:`CachedText`): the one other thing the extraction service keeps
besides image features."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hica_bench.extraction.cache import FeatureCache


class CachedText:
    """A described pair's text encoder whose ``encode`` is served from the feature cache (its ``texts`` folder): each
    call's embeddings are stored under (the text encoder's identity, the device, the texts in order), so a run whose image features and
    texts are all cached never builds the pair (a cached zero-shot run does not import open_clip).
    A miss builds the pair and encodes as it would have; the stored array is exactly what that returned. Anything
    else of the text encoder (``embed``, ``module``, ``tokenizer``, ``embed_dim`` ...) is the built one's."""

    def __init__(self, identity: str, device: str, cache_dir: Path, built: Callable[[], Any]) -> None:
        self.identity, self.device, self._cache_dir, self._built = identity, device, cache_dir, built

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            return self._built().encode(texts)
        parts = {"text_encoder": self.identity, "device": self.device, "texts": texts}
        cache, key = self._cache, FeatureCache.key(parts)
        found = cache.get(key)
        if found is not None:
            return found
        embedded = self._built().encode(texts)
        if isinstance(embedded, np.ndarray) and embedded.dtype != object and len(embedded) == len(texts):
            cache.put(key, embedded, parts)
        return embedded

    @functools.cached_property
    def _cache(self) -> FeatureCache:
        """The cache's ``texts`` folder, opened (made) on the first ``encode``."""
        return FeatureCache(self._cache_dir, "texts")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._built(), name)

    def __deepcopy__(self, memo: dict) -> Any:
        """A copy is the built text encoder's own deep copy (a method adapts that, never the frozen one), and is not
        served from the cache: its weights are the method's to change."""
        return copy.deepcopy(self._built(), memo)

    def __copy__(self) -> Any:
        return copy.copy(self._built())

    def __reduce__(self) -> Any:
        """Pickled as the built text encoder (the cache is this process's)."""
        return _identity, (self._built(),)


def _identity(value: Any) -> Any:
    return value
