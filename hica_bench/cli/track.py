"""``hica-bench track``: finished results to MLflow or W&B (what ``run --track`` does at the end of a run)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hica_bench.cli.app import RESULTS_ARGUMENT_HELP, app

TO_HELP = ("mlflow (a local store under the results folder), mlflow:URI (a tracking server such as "
           "http://127.0.0.1:5000, a folder, or any MLflow store URI), or wandb (offline run files under the results "
           "folder, for `wandb sync`); repeat for several.")
EXPERIMENT_HELP = "MLflow experiment / W&B project the runs go under [default: the results folder's name]."


def targets(values: List[str]):
    """The parsed ``--track`` / ``--to`` values, each tracker once."""
    from hica_bench.errors import UserError
    from hica_bench.tracking import Target

    parsed = [Target.parse(value) for value in values]
    if len({t.tracker for t in parsed}) < len(parsed):
        raise UserError("name each tracker once (--track mlflow[:URI], --track wandb)")
    return parsed


def track_results(trackers: list, loaded: list, experiment: str, grid: Optional[str] = None) -> None:
    """Track results read with their files to each prepared tracker, a line per tracker."""
    from hica_bench.tracking import grids

    cells = grids(loaded, grid)
    for tracker in trackers:
        outcome = tracker.track(cells, experiment)
        print(f"tracked to {outcome.describe()}")
        for line in outcome.lines:
            print(f"  {line}")


@app.command("track")
def track_(
    results: List[Path] = typer.Argument(..., help=RESULTS_ARGUMENT_HELP),
    to: List[str] = typer.Option(..., "--to", help=TO_HELP),
    experiment: Optional[str] = typer.Option(None, help=EXPERIMENT_HELP),
    grid: Optional[str] = typer.Option(None, help="Name of the grid's parent run [default: the results folder's name]."),
) -> None:
    """Send finished results to MLflow or Weights & Biases: a run per cell (params: its identity; metrics: every
    score; tags: status, origin, reason; artifacts: saved predictions), under a parent run per grid carrying its
    report. Tracking the same results again creates no duplicate runs (runs are keyed by cell id)."""
    from hica_bench.errors import UserError
    from hica_bench.results import out_lock, read_many_with_files, results_files
    from hica_bench.tracking import check_name

    chosen = targets(to)
    files = results_files(results)
    loaded = read_many_with_files(results)
    if not loaded:
        raise UserError(f"{', '.join(map(str, results))} hold no results")
    name = check_name(experiment if experiment is not None else files[0].parent.resolve().name, "--experiment")
    grid = None if grid is None else check_name(grid, "--grid")
    trackers = [target.prepare(files[0].parent) for target in chosen]
    with out_lock(files[0].parent, "track"):  # not beside a run or another tracking of these results
        track_results(trackers, loaded, name, grid)
