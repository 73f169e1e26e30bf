"""``hica-bench leaderboard``: Markdown and CSV tables from one or more results files."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hica_bench.cli.app import RESULTS_ARGUMENT_HELP, app
from hica_bench.errors import UserError


@app.command("leaderboard")
def leaderboard_(
    results: List[Path] = typer.Argument(..., help=RESULTS_ARGUMENT_HELP),
    out: Optional[Path] = typer.Option(None, help="Folder for leaderboard.md/.csv [default: beside the one results file; "
                                                  "required for several]."),
) -> None:
    """Write Markdown and CSV leaderboards from one or more results files."""
    from hica_bench import data, leaderboard
    from hica_bench.results import read_many

    if out is None:
        if len(results) > 1:
            raise UserError("give --out: where should the leaderboard of several results files go?")
        out = results[0] if results[0].is_dir() else results[0].parent
    data.writable_dir(out, "--out folder")
    loaded = read_many(results)
    if not loaded:
        raise UserError(f"{', '.join(map(str, results))} hold no results")
    md_path, csv_path = leaderboard.write(loaded, out)
    print(md_path.read_text())
    print(f"written: {md_path}, {csv_path}")
