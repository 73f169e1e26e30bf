"""``hica-bench report``: the page to publish from (intervals, paired tests, curves, calibration, ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hica_bench.cli.app import RESULTS_ARGUMENT_HELP, app
from hica_bench.errors import UserError


@app.command("report")
def report_(
    results: List[Path] = typer.Argument(..., help=RESULTS_ARGUMENT_HELP),
    out: Path = typer.Option(..., help="Folder for report.html, its figures (PNG and SVG) and the CSVs of the tests."),
    reference: Optional[str] = typer.Option(None, help="Method the paired tests compare every other method with "
                                                       "[default: linear-probe, when it has results]."),
    bootstrap: int = typer.Option(0, help="Also a test-set bootstrap interval of ACC per seed with this many resamples "
                                          "(needs predictions saved with `run --save-predictions`); 0: none."),
    latex: bool = typer.Option(False, "--latex", help="Also the figures as PDF, and compile latex/main.tex (the tables "
                                                      "every report writes there) with pdflatex when one is installed, "
                                                      "its first page rendered to latex/main-page1.png."),
) -> None:
    """Write a report to publish from: tables with 95 % intervals and paired significance, few-shot curves,
    calibration, average ranks with a Friedman test and a critical-difference diagram, as one HTML page."""
    from hica_bench import data, report
    from hica_bench.results import read_many_with_files

    if bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 (none) or a number of resamples, got {bootstrap}")
    data.writable_dir(out, "--out folder")
    loaded = read_many_with_files(results)
    if not loaded:
        raise UserError(f"{', '.join(map(str, results))} hold no results")
    page = report.write([r for r, _ in loaded], out, reference, bootstrap, {r.cell_id: f.parent for r, f in loaded},
                        [str(p) for p in results], latex=latex)
    print(f"written: {page}")
    print(f"latex: {out / 'latex' / 'main.tex'}" + "".join(f" ({what})" for _, what in report.LATEX_OUTCOME))
