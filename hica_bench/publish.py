"""The one publish step: a results folder's tables and report, made from its ``results.jsonl`` alone.

The CLI calls :func:`publish` after ``run``, ``merge`` and ``explain`` (the leaderboards, ``leaderboard.md`` and
``leaderboard.csv`` with the robustness table; ``report.html`` with its figures and CSVs, and the explanations found
under ``explanations/``). Publishing reads results and writes derived files only: it never runs a cell, and the run
loop (:mod:`hica_bench.runner`) never publishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hica_bench import leaderboard, report as report_page
from hica_bench.results import CellResult, ResultsStore


@dataclass
class Published:
    """What :func:`publish` wrote."""

    leaderboard: tuple[Path, Path] | None = None  #: leaderboard.md and leaderboard.csv
    report: Path | None = None  #: report.html; None when not asked for or no cell finished ok


def publish(out_dir: Path, results: list[CellResult] | None = None, *, tables: bool = True,
            report: bool = True) -> Published:
    """The leaderboards (``tables``) and the report (``report``, when a cell finished ok) of ``out_dir``'s own
    ``results.jsonl`` (``results``: those records, already read), written into ``out_dir``."""
    out_dir = Path(out_dir)
    if results is None:
        results = list(ResultsStore(out_dir / "results.jsonl").load().values())
    published = Published()
    if tables:
        published.leaderboard = leaderboard.write(results, out_dir)
    if report:
        published.report = report_page.write_beside(results, out_dir)
    return published
