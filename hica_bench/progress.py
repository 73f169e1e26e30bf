"""What a run shows while it works (:class:`hica_bench.events.Events`): a live display on a terminal, plain
timestamped lines elsewhere (CI logs, Slurm output files), at least one a minute; nothing with ``--quiet``.

The log starts when the grid is known (every input checked), so a bad input still gets exactly one line on stderr;
a step before that which outlasts the heartbeat (a first encoder settings probe) is still announced by it.

Both go to stderr, so stdout keeps only the summary. Text from plugins and users is never read as rich markup.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hica_bench.extraction import ExtractionRecord
from hica_bench.results import CellKey, CellResult, Status
from hica_bench.events import Events


def _cell(key: CellKey) -> str:
    corrupted = f" ({key.corruption} severity {key.severity})" if key.corruption else ""
    return f"{key.dataset}{corrupted} {key.method} k={key.k} seed={key.seed}"


def _outcome(result: CellResult) -> str:
    if result.status is Status.OK and result.metrics is not None:
        return f"ok (ACC {100 * result.metrics.acc:.1f}, AUC {100 * result.metrics.auc:.1f})"
    return f"{result.status.value}: {result.reason}"


class _Counts:
    def __init__(self) -> None:
        self.total = self.done = self.ok = self.failed = 0

    def add(self, result: CellResult) -> None:
        self.done += 1
        self.ok += result.status is Status.OK
        self.failed += result.status is Status.FAILED

    def __str__(self) -> str:
        return (f"{self.done}/{self.total}: {self.ok} ok, {self.done - self.ok - self.failed} not applicable, "
                f"{self.failed} failed")


def decided_lines(encoder: str, results: list[CellResult]) -> list[str]:
    """One line per reason for cells decided not applicable before encoding: how many, which methods, why."""
    by_reason: dict[str, list[CellResult]] = {}
    for result in results:
        by_reason.setdefault(result.reason or "", []).append(result)
    return [f"{encoder}: {len(found)} cells not applicable, decided before encoding "
            f"({', '.join(dict.fromkeys(r.key.method for r in found))}): {reason}"
            for reason, found in by_reason.items()]


class LiveEvents(Events):
    """A rich live display: the current step, the encoder pass with its images/s and ETA, and the cells with done and
    failed counts and the one running. Use as a context manager."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.counts = _Counts()
        self._stage = self._cells = self._split = None

    def __enter__(self) -> "LiveEvents":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _end_stage(self) -> None:
        if self._stage is not None:
            self.progress.remove_task(self._stage)
            self._stage = None

    def stage(self, text: str) -> None:
        self._end_stage()
        self._stage = self.progress.add_task(escape(text), total=None, rate="")

    def cells(self, encoder: str, total: int, skipped: int) -> None:
        self._end_stage()
        if self._cells is not None:  # the previous encoder's cells are done
            self.progress.remove_task(self._cells)
        self.counts = _Counts()
        self.counts.total = total - skipped
        self._cells = self.progress.add_task(escape(f"{encoder}: cells ({skipped} already finished)"),
                                             total=total - skipped, rate="")

    def split(self, dataset: str, split: str, images: int) -> Callable[[int], None]:
        self._end_stage()
        task = self._split = self.progress.add_task(escape(f"{dataset} {split} features"), total=images, rate="")
        started, done = time.perf_counter(), 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            rate = done / max(time.perf_counter() - started, 1e-9)
            self.progress.update(task, completed=done, rate=f"{rate:.0f} img/s")
        return advance

    def split_done(self, record: ExtractionRecord) -> None:
        if self._split is not None:
            self.progress.remove_task(self._split)
            self._split = None

    def decided(self, encoder: str, results: list[CellResult]) -> None:
        for result in results:
            self.counts.add(result)
        if self._cells is not None and results:
            self.progress.advance(self._cells, len(results))

    def task(self, text: str, total: int) -> Callable[[int], None]:
        self._end_stage()
        task = self._stage = self.progress.add_task(escape(text), total=total, rate="")
        self.progress.refresh()  # drawn now, however short the step
        started, done = time.perf_counter(), 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            self.progress.update(task, completed=done, rate=f"{done / max(time.perf_counter() - started, 1e-9):.0f}/s")
        return advance

    def cell(self, key: CellKey) -> None:
        c = self.counts
        if self._cells is not None:
            self.progress.update(self._cells, description=escape(f"{key.encoder}: cells ({c.ok} ok, {c.failed} failed): {_cell(key)}"))

    def cell_done(self, result: CellResult) -> None:
        self.counts.add(result)
        if self._cells is not None:
            self.progress.advance(self._cells)


class LogEvents(Events):
    """Plain timestamped lines: each step, each encoder pass (with its images/s and ETA every ``every`` seconds), the
    cells' counts every ``every`` seconds and when an encoder's cells are done (each failed cell on a line of its own,
    with its reason; every cell's outcome is in the results file), one line per reason for the cells decided not
    applicable before encoding, and a line at least every ``heartbeat`` seconds while a long step runs."""

    def __init__(self, stream: TextIO | None = None, every: float = 10.0, heartbeat: float = 60.0) -> None:
        self.stream = stream
        self.every, self.heartbeat = every, heartbeat
        self.counts = _Counts()
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._doing, self._since = "", time.monotonic()
        self._started = False  # nothing but the heartbeat before the grid is known
        self._cells_line = time.monotonic()  # when the cells' counts were last logged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LogEvents":
        self._thread = threading.Thread(target=self._beat, name="hica-bench-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _line(self, text: str) -> None:
        with self._lock:
            stream = self.stream or sys.stderr
            try:
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(text.split())}", file=stream, flush=True)
            except (OSError, ValueError):  # the log's reader went away: the run goes on
                pass
            self._last = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(min(self.heartbeat, 5.0)):
            if time.monotonic() - self._last >= self.heartbeat and self._doing:
                self._line(f"still {self._doing} ({time.monotonic() - self._since:.0f} s)")

    def _now(self, doing: str) -> None:
        self._doing, self._since = doing, time.monotonic()

    def stage(self, text: str) -> None:
        self._now(text)
        if self._started:
            self._line(text)

    def cells(self, encoder: str, total: int, skipped: int) -> None:
        self.counts = _Counts()
        self.counts.total = total - skipped
        self._started = True
        self._line(f"grid with {encoder}: {total} cells, {skipped} already finished, {total - skipped} to run")

    def split(self, dataset: str, split: str, images: int) -> Callable[[int], None]:
        name = f"{dataset} {split} features"
        self._now(f"encoding {name}")
        started = last = time.perf_counter()
        done = 0

        def advance(count: int) -> None:
            nonlocal done, last
            done += count
            now = time.perf_counter()
            if now - last >= self.every and done < images:
                rate = done / (now - started)
                self._line(f"{name}: {done}/{images} images, {rate:.0f} img/s, about {(images - done) / rate:.0f} s left")
                last = now
        return advance

    def task(self, text: str, total: int) -> Callable[[int], None]:
        self._now(f"{text} ({total})")
        if self._started:
            self._line(f"{text}: {total} to do")
        return lambda count: None  # the heartbeat says it is still going

    def split_done(self, record: ExtractionRecord) -> None:
        where = f"{record.dataset} {record.split} features"
        if record.cached:
            self._line(f"{where}: {record.n_images} from the cache")
        else:
            self._line(f"{where}: {record.n_images} images encoded in {record.seconds:.1f} s "
                       f"({record.images_per_s or 0:.0f} img/s)")

    def cell(self, key: CellKey) -> None:
        self._now(f"running {_cell(key)}")

    def cell_done(self, result: CellResult) -> None:
        self.counts.add(result)
        c = self.counts
        if result.status is Status.FAILED:
            self._line(f"cell {c.done}/{c.total} {_cell(result.key)}: {_outcome(result)}")
        elif c.done == c.total or time.monotonic() - self._cells_line >= self.every:
            self._line(f"cells {c} (last: {_cell(result.key)}: {_outcome(result)})")
            self._cells_line = time.monotonic()
        self._doing = ""

    def decided(self, encoder: str, results: list[CellResult]) -> None:
        for result in results:
            self.counts.add(result)
        for line in decided_lines(encoder, results):
            self._line(line)
