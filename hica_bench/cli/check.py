"""``hica-bench check``: the regression gate, a fresh run against a committed baseline cell by cell."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hica_bench.cli.app import app
from hica_bench.files import atomic_write


@app.command("check")
def check_(
    baseline: Path = typer.Option(..., help="Committed baseline: a results.jsonl, a leaderboard.csv, or a folder with one."),
    results: Path = typer.Option(..., help="The fresh run: a results.jsonl, a leaderboard.csv, or a folder with one."),
    tolerance: float = typer.Option(1.0, help="Allowed ACC/AUC drop per cell, in percentage points."),
    noise_z: float = typer.Option(0.0, help="If > 0, allow max(tolerance, Z × seed noise from the baseline's std) instead."),
    throughput_tolerance: float = typer.Option(0.4, help="Allowed relative drop of harness efficiency (0.4 = 40 %)."),
    report: Optional[Path] = typer.Option(None, help="Also write the comparison as JSON here."),
) -> None:
    """Compare a fresh run with a baseline cell by cell; exit 1 on a regression, 0 when clean, 2 on bad input."""
    from hica_bench import check, data

    if report:
        data.writable_file(report, "--report")
    outcome = check.compare(check.load(baseline, "baseline"), check.load(results, "results"),
                            tolerance, noise_z, throughput_tolerance)
    rows = outcome.rows
    stdout = Console(width=200)  # CI logs: never fold the table
    shown = rows[rows["verdict"].isin(["regressed", "improved", "changed", "not comparable"])]
    if len(shown):
        table = Table(title=escape(f"{results} vs baseline {baseline}"))
        for column in ("verdict", "dataset", "method", "k", "what", "baseline", "run", "change", "allowed", "note"):
            table.add_column(column, overflow="fold")
        for row in shown.to_dict("records"):
            style = "red" if row["verdict"] == "regressed" else "green" if row["verdict"] == "improved" else ""
            cells = [row["dataset"], row["method"], "" if row["k"] is None else str(row["k"]), row["what"],
                     row["baseline"], row["run"], row["change"], row["allowed"], row["note"]]
            table.add_row(f"[{style}]{row['verdict']}[/]" if style else row["verdict"], *(escape(str(c)) for c in cells))
        stdout.print(table)
    missing = rows[rows["verdict"] == "missing"]
    for (dataset, method), part in missing.groupby(["dataset", "method"], sort=True):
        stdout.print(f"missing from the run: {dataset} {method} k={','.join(str(int(k)) for k in sorted(set(part['k'])))}",
                     markup=False, highlight=False)
    for note in outcome.notes:
        stdout.print(f"note: {note}", markup=False, highlight=False)
    stdout.print(f"{outcome.compared} cells compared; checks: {outcome.count('regressed')} regressed, {outcome.count('improved')} "
                 f"improved, {outcome.count('ok')} within tolerance, {outcome.count('not comparable')} not comparable; "
                 f"{len(missing)} cells missing from the run", highlight=False)
    if report:
        atomic_write(report, rows.to_json(orient="records", indent=1) + "\n")
    if outcome.regressed:
        raise typer.Exit(1)
