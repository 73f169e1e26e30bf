"""``hica-bench export`` and ``hica-bench import``: results as one checked file to share (:mod:`hica_bench.bundle`),
and that file merged into a results folder, then published."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hica_bench.cli.app import app


@app.command("export")
def export_(
    results: List[Path] = typer.Argument(..., help="Results files written by `hica-bench run`, or folders holding one; "
                                                   "several are combined as `hica-bench merge` combines them."),
    out: Path = typer.Option(..., help="The bundle file to write (a .tar.gz); replaced if it exists."),
    suite: Optional[Path] = typer.Option(None, help="Also the suite file the results were run from (a run does not "
                                                    "record it), checked as `run --suite` reads it."),
    prompts_from: Optional[Path] = typer.Option(None, help="Folder the records' relative prompt file paths "
                                                           "(DATASET:prompts=FILE) are taken from: where the run was "
                                                           "started [default: the current folder]."),
) -> None:
    """Write RESULTS as one bundle: the records, their saved predictions, the prompt files their datasets name and the
    suite, with a manifest of every file's sha256 (see `hica-bench import`)."""
    from hica_bench import bundle, data
    from hica_bench import suite as suite_file

    if suite is not None:
        suite_file.load(suite)  # a malformed suite is refused now, not by whoever imports the bundle
    target = data.writable_file(out, "--out bundle")
    exported = bundle.export(results, target, suite=suite, prompts_from=prompts_from)
    prompts = len(exported.prompt_files)
    print(f"exported {exported.cells} cells, {exported.predictions} saved predictions files, {prompts} prompt "
          f"file{'' if prompts == 1 else 's'}{', the suite' if exported.suite else ''}")
    print(f"written: {exported.path} ({exported.size:,} bytes)")


@app.command("import")
def import_(
    bundle_file: Path = typer.Argument(..., metavar="BUNDLE", help="A bundle written by `hica-bench export`."),
    out: Path = typer.Option(..., help="Folder to merge it into: a results.jsonl already there is merged with the "
                                       "bundle's (as `hica-bench merge` merges), and the leaderboards are written."),
    report: bool = typer.Option(True, "--report/--no-report", help="Also write report.html (see `hica-bench report`)."),
) -> None:
    """Check a bundle to its last byte (every member's sha256, names, links, sizes, versions) and merge it into
    --out: records, saved predictions, prompt files and suite. A bundle that fails any check writes nothing."""
    from hica_bench import bundle, data, publish
    from hica_bench.results import out_lock

    with bundle.opened(bundle_file) as opened:  # everything is checked before --out is touched
        out = data.writable_dir(out, "--out folder")
        with out_lock(out, "merge"):  # a run or merge writing to --out meanwhile would lose records
            imported = bundle.import_into(opened, out)
            published = publish.publish(out, imported.merged.results, report=report)
    merged = imported.merged
    print(f"imported {bundle_file}: {imported.cells} cells; {out / 'results.jsonl'} now holds {len(merged.results)} "
          f"cells ({sum(merged.dropped.values())} duplicate records dropped)")
    for why, count in merged.dropped.items():
        print(f"  dropped {count}: {why}")
    if merged.history:
        print(f"  kept {merged.history} earlier records of re-run cells in {out / 'results.jsonl'} as they were "
              "(the newest counts)")
    print(f"  {imported.predictions} saved predictions files written"
          + (f" ({imported.unchanged} of the bundle's files were there already)" if imported.unchanged else ""))
    for path in imported.prompt_files:
        print(f"  prompt file: {path}")
    if imported.suite is not None:
        print(f"  suite: {imported.suite}")
    md_path, csv_path = published.leaderboard
    print(f"written: {out / 'results.jsonl'}, {md_path}, {csv_path}")
    if published.report is not None:
        print(f"report: {published.report}")
