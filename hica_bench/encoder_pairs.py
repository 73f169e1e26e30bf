"""Encoder pairs as a run holds them: described by their card, built on first use (:class:`LazyEncoderPair`), so a
run whose features are all cached never builds the models; their text embeddings are cached too
(:class:`hica_bench.extraction.texts.CachedText`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from hica_bench.errors import UserError
from hica_bench.extraction.texts import CachedText
from hica_bench.interfaces import EncoderCard, EncoderPair
from hica_bench.registry import Choice


class EncoderBuildError(UserError):
    """Building a described encoder pair failed when a run first needed its models: the run stops with this line."""


class LazyEncoderPair:
    """An encoder pair known by its :class:`~hica_bench.interfaces.EncoderCard` and built on first use of its models
    (``image``, ``text`` or ``modules``). A run whose features are all cached, with methods that use only image
    features, never builds it; ``aligned``, ``device`` and ``card`` never build it. The built pair must match the
    card its spec's ``describe`` gave, else the run stops naming the plugin."""

    def __init__(self, card: EncoderCard, build: Callable[[], EncoderPair], label: str, device: str,
                 cache_dir: Path | None = None, built: EncoderPair | None = None) -> None:
        self.card, self.aligned, self.device = card, card.aligned, device
        self._build, self._label = build, label
        self._pair: EncoderPair | None = built  #: already built (a spec without ``describe``), else on first use
        self._building = threading.RLock()
        self._text = None if cache_dir is None or card.text is None else CachedText(
            card.text, device, Path(cache_dir), lambda: self.pair().text)

    def pair(self) -> EncoderPair:
        """The built pair (built now on first call; one build even when threads ask at once, e.g. a timed-out cell's)."""
        with self._building:
            return self._built_pair()

    def _built_pair(self) -> EncoderPair:
        if self._pair is None:
            try:
                pair = self._build()
            except UserError as exc:
                raise EncoderBuildError(str(exc)) from None
            if pair.card != self.card:
                raise EncoderBuildError(f"encoder {self._label}: the plugin's describe() gave {self.card} but the built "
                                        f"pair is {pair.card}; the plugin must make them agree")
            self._pair = pair
        return self._pair

    @property
    def image(self) -> Any:
        return self.pair().image

    @property
    def text(self) -> Any:
        """The text encoder: with a cache folder, a :class:`CachedText` (built only when a text is not cached)."""
        if self.card.text is None:
            return None
        return self._text if self._text is not None else self.pair().text

    @property
    def modules(self) -> dict[str, Any]:
        return self.pair().modules


def encoder_pair(encoder: Choice, device: str, cache_dir: Path | None = None) -> EncoderPair | LazyEncoderPair:
    """``encoder`` on ``device``: a :class:`LazyEncoderPair` when its spec can describe it, else built now. With
    ``cache_dir`` (a run's feature cache), the described pair's text embeddings are cached there (:class:`CachedText`)."""
    card = encoder.describe(device=device)
    if card is None:
        pair = encoder.build(device=device)
        if cache_dir is None or pair.text is None:
            return pair
        return LazyEncoderPair(pair.card, lambda: pair, encoder.label, device, cache_dir, built=pair)  # texts cached
    if not isinstance(card, EncoderCard):
        raise EncoderBuildError(f"encoder {encoder.label}: the plugin's describe() returned {type(card).__name__}, "
                                "not an EncoderCard")
    return LazyEncoderPair(card, lambda: encoder.build(device=device), encoder.label, device, cache_dir)
