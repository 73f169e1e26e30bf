"""What a run reports while it works (:class:`Events`): the loop, the executors and the dataset plugins call it; the CLI
shows it (:mod:`hica_bench.progress`)."""

from __future__ import annotations

from typing import Callable

from hica_bench.extraction import ExtractionRecord
from hica_bench.results import CellKey, CellResult


class Events:
    """What a run reports while it works (the CLI shows it: a live display on a terminal, log lines elsewhere, nothing
    with ``--quiet``). Every method is a no-op here."""

    def stage(self, text: str) -> None:
        """A step without a count (e.g. the encoder settings probe); the next call of any kind ends it."""

    def cells(self, encoder: str, total: int, skipped: int) -> None:
        """The grid's cells with ``encoder`` are known: ``total`` cells, ``skipped`` of them already finished."""

    def split(self, dataset: str, split: str, images: int) -> Callable[[int], None]:
        """An encoder pass starts; the returned function is called with each batch's image count."""
        return lambda count: None

    def task(self, text: str, total: int) -> Callable[[int], None]:
        """A counted step of a plugin (:func:`hica_bench.data.progress`, e.g. decoding a folder of images) starts; the
        returned function is called with each step's count; the next call of any kind ends it."""
        return lambda count: None

    def split_done(self, record: ExtractionRecord) -> None:
        """An encoder pass (or cache read) finished."""

    def cell(self, key: CellKey) -> None:
        """A cell starts."""

    def cell_done(self, result: CellResult) -> None:
        """A cell finished and its record is in the results file."""

    def decided(self, encoder: str, results: list[CellResult]) -> None:
        """Cells whose outcome the methods' needs told before anything was encoded (not applicable on ``encoder``'s
        pair) are in the results file; by default each is reported as a finished cell."""
        for result in results:
            self.cell_done(result)
