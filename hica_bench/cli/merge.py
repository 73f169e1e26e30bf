"""``hica-bench merge``: several results files (the shards of ``run --shard``) combined into one, then published."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from hica_bench.cli.app import app
from hica_bench.errors import UserError
from hica_bench.files import atomic_write


@app.command("merge")
def merge_(
    results: List[Path] = typer.Argument(..., help="Results files, or folders holding one (e.g. the shard-I-of-N "
                                                   "folders of `run --shard`)."),
    out: Path = typer.Option(..., help="Folder for the merged results.jsonl, its leaderboards and report (a "
                                       "results.jsonl already there is refused unless it is one of RESULTS)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Also write report.html (see `hica-bench report`)."),
) -> None:
    """Combine results files into one: a cell recorded twice with the same outcome is kept once, a finished record
    beats a failed one, and two different outcomes for one cell are refused."""
    from hica_bench import data, publish
    from hica_bench.results import merge_shards, out_lock, results_files

    out = data.writable_dir(out, "--out folder")
    target = out / "results.jsonl"
    with out_lock(out, "merge"):  # a run or another merge writing to --out meanwhile would lose records
        if target.exists() and target.resolve() not in {p.resolve() for p in results_files(results)}:
            raise UserError(f"{target} exists and is not among the files to merge; add it to them or use another --out")
        merged = merge_shards(results, out)
        if not merged.results:
            raise UserError(f"{', '.join(map(str, results))} hold no results")
        atomic_write(target, merged.text)
        published = publish.publish(out, merged.results, report=report)
    md_path, csv_path = published.leaderboard
    print(f"merged {len(results)} results files: {len(merged.results)} cells "
          f"({sum(merged.dropped.values())} duplicate records dropped)")
    for why, count in merged.dropped.items():
        print(f"  dropped {count}: {why}")
    if merged.history:
        print(f"  kept {merged.history} earlier records of re-run cells in {target} as they were (the newest counts)")
    print(f"written: {target}, {md_path}, {csv_path}")
    if published.report is not None:
        print(f"report: {published.report}")
