"""``hica-bench history``: several commits' results (e.g. the gate's run at each commit) as tables and a figure of every
metric and of the paired throughput efficiency over the commits, with the gate's verdict at each."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hica_bench.cli.app import app


@app.command("history")
def history_(
    results: List[Path] = typer.Argument(..., help="Results files written by `hica-bench run` (or `check`'s run), or "
                                                   "folders holding one; typically one per commit. The same cell at "
                                                   "several commits is what this command is for."),
    out: Path = typer.Option(..., help="Folder for history.md, history.csv, verdicts.csv and history.png / .svg."),
    baseline: Optional[Path] = typer.Option(None, help="Gate every commit against this baseline (a results.jsonl, a "
                                                       "leaderboard.csv, or a folder with one) instead of the commit "
                                                       "before it."),
    tolerance: float = typer.Option(1.0, help="Allowed ACC/AUC drop per cell, in percentage points (as `check`)."),
    noise_z: float = typer.Option(0.0, help="If > 0, allow max(tolerance, Z × seed noise) instead (as `check`)."),
    throughput_tolerance: float = typer.Option(0.4, help="Allowed relative drop of harness efficiency (as `check`)."),
) -> None:
    """Tables and a figure of each metric and of the paired throughput efficiency over commits (ordered by the recorded
    commit time), each commit gated against the one before it (or against --baseline). Exit 0 when written, 2 on bad
    input (nothing written)."""
    from hica_bench import data, history

    found = history.build(history.read(results), history.default_gate(baseline, tolerance, noise_z, throughput_tolerance))
    data.writable_dir(out, "--out folder")
    written = history.write(found, out)
    for row in history.commit_rows(found):
        what = row["regressed"] if row["verdict"] == "regression" else row["improved"] if row["verdict"] == "improvement" else ""
        against = f" vs {row['against']}" if row["against"] else ""
        print(f"{row['order']:>3}  {row['label']}  {row['commit_time']}  {row['verdict']}{against}"
              + (f": {what}" if what else ""))
    regressions = sum(v.verdict == "regression" for v in found.verdicts)
    print(f"{len(found.commits)} commits; {regressions} with a regression")
    for note in found.notes:
        print(f"note: {note}")
    print(f"written: {', '.join(str(path) for path in written.values())}")
