"""``hica-bench run``: a suite and flags -> the plan's grid and settings (:func:`hica_bench.plan.configure`) -> the
run loop (:mod:`hica_bench.runner`) -> the published tables and report (:mod:`hica_bench.publish`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hica_bench.cli.app import (AMP_OPTION, BACKEND_OPTION, BATCH_SIZE_OPTION, CACHE_DIR_OPTION, CHANNELS_LAST_OPTION,
                                COMPILE_OPTION, DATA_ROOT_OPTION, DEVICE_OPTION, DOWNLOAD_OPTION, THREADS_OPTION, app,
                                console, registry, requested_extraction)
from hica_bench.cli.track import TO_HELP, targets, track_results


@app.command()
def run(
    ctx: typer.Context,
    suite: Optional[Path] = typer.Option(None, help="A suite file (.toml or .yaml) naming datasets, methods, encoders, "
                                                    "shots, seeds, size, max_test and out; flags given here override it."),
    datasets: Optional[str] = typer.Option(None, help="Comma list of datasets (see `hica-bench list dataset`) "
                                                      "[default: the suite's, else the installed plugins' default suite]."),
    methods: Optional[str] = typer.Option(None, help="Comma list of methods, each NAME or NAME:opt=value:opt=value "
                                                     "[default: the suite's, else the installed plugins' default suite]."),
    encoders: Optional[str] = typer.Option(None, "--encoders", "--encoder", help=(
        "Comma list of encoder pairs, each NAME or NAME:opt=value (see `hica-bench list encoder`); the grid runs over "
        "each [default: the suite's, else the one the installed plugins declare as default].")),
    protocols: Optional[str] = typer.Option(None, help="Comma list of evaluation protocols, each NAME or "
                                            "NAME:opt=value (see `hica-bench list protocol`): few-shot, few-shot-val, "
                                            "support-cv, oracle [default: the suite's, else the installed plugins' "
                                            "default (few-shot)]."),
    shots: Optional[str] = typer.Option(None, help="Comma list of shots per class [default: the suite's, else 1,5,20]."),
    seeds: Optional[str] = typer.Option(None, help="Comma list of seeds [default: the suite's, else 0-9]."),
    size: Optional[int] = typer.Option(None, help="Image size of the dataset files (MedMNIST: 28, 64, 128, 224) "
                                                  "[default: the suite's, else 28]."),
    corruptions: Optional[str] = typer.Option(None, help="Robustness track: also run every dataset with its test split "
                                              "corrupted (MedMNIST-C's corruptions for the dataset; supports stay clean): "
                                              "all, or a comma list of names (see docs/robustness.md) [default: the suite's, else none]."),
    severities: Optional[str] = typer.Option(None, help="With --corruptions: comma list of severities 1-5 "
                                             "[default: the suite's, else 1,2,3,4,5]."),
    slice_axis: str = typer.Option("0", help="3D datasets with a 2D encoder: encode each volume's slices along axis 0, "
                                   "1 or 2 of (D, H, W), or along all three (planes); part of the feature identity."),
    slice_pool: str = typer.Option("mean", help="3D datasets with a 2D encoder: pool a volume's slice features by "
                                   "their mean or element-wise max; part of the feature identity."),
    slice_step: int = typer.Option(1, help="3D datasets with a 2D encoder: encode every N-th slice of each volume (the "
                                   "middle one of each group of N; 1: all); part of the feature identity."),
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    channels_last: Optional[bool] = CHANNELS_LAST_OPTION,
    threads: int = THREADS_OPTION,
    compile: bool = COMPILE_OPTION,
    amp: bool = AMP_OPTION,
    data_root: Optional[str] = DATA_ROOT_OPTION,
    cache_dir: Optional[str] = CACHE_DIR_OPTION,
    out: Optional[Path] = typer.Option(None, help="Folder for results.jsonl and the leaderboards; reruns resume here "
                                                  "[default: the suite's, else hica-bench-results]."),
    max_test: Optional[int] = typer.Option(None, help="Evaluate on the first N test images only (quick runs; recorded) "
                                                      "[default: the suite's, else the whole test split]."),
    download: bool = DOWNLOAD_OPTION,
    cell_timeout: Optional[float] = typer.Option(
        None, help="Seconds one cell's fit + predict may take; past it the cell fails and the grid goes on [default: no limit]."),
    force: bool = typer.Option(False, "--force", help="Run every selected cell again, also those finished with the same "
                                                      "identity (their records stay in the file; the newest counts)."),
    save_predictions: bool = typer.Option(False, "--save-predictions", help="Keep each cell's test probabilities and "
                                          "labels in --out/predictions/CELL_ID.npz (compressed numpy, no pickle)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress: neither the live display on a terminal nor "
                                                            "the log lines elsewhere (errors and the summary remain)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html (intervals, paired tests, curves, "
                                "calibration, ranks) beside the leaderboards; see `hica-bench report`."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave out (and count) unreadable image files "
                                         "of datasets that take the skip_bad_images option (folder) instead of stopping."),
    executor: str = typer.Option("in-process", help="Where cells run: in-process, or ray (a local Ray runtime, or "
                                 "the cluster named by --ray-address; pip install 'hica-bench[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="With --executor ray: join this Ray cluster (auto, or "
                                              "HOST:PORT of `ray start --head`) [default: start a local runtime]."),
    workers: Optional[int] = typer.Option(None, help="With --executor ray: cells in flight at once (a local runtime "
                                          "gets this many CPUs) [default: every CPU of the runtime]."),
    shard: Optional[str] = typer.Option(None, help="I/N: run only shard I (0 to N-1) of the grid's cells, into "
                                        "--out/shard-I-of-N (Slurm arrays); combine them with `hica-bench merge`."),
    track: List[str] = typer.Option([], "--track", help="After the run, send its results to " + TO_HELP[0].lower()
                                    + TO_HELP[1:] + " See `hica-bench track`."),
    experiment: Optional[str] = typer.Option(None, help="With --track: the MLflow experiment / W&B project [default: "
                                             "the suite file's name, else the --out folder's]."),
) -> None:
    """Run the grid datasets × protocols × methods × shots × seeds and write results and leaderboards to --out."""
    from hica_bench import plan, publish, runner
    from hica_bench.progress import LiveEvents, LogEvents
    from hica_bench.results import out_lock

    request = plan.RunRequest(
        suite=suite, datasets=datasets, methods=methods, encoders=encoders, protocols=protocols, shots=shots,
        seeds=seeds, size=size,
        max_test=max_test, out=out, corruptions=corruptions, severities=severities, slice_axis=slice_axis,
        slice_pool=slice_pool, slice_step=slice_step, device=device, data_root=data_root, cache_dir=cache_dir, download=download,
        extraction=requested_extraction(backend, batch_size, channels_last, threads, amp, compile),
        cell_timeout=cell_timeout, force=force, save_predictions=save_predictions, report=report,
        skip_bad_images=skip_bad_images, executor=executor, ray_address=ray_address, workers=workers, shard=shard)
    trackers = targets(track)  # a wrong --track is one line before the grid is even planned
    grid, settings = plan.configure(request, lambda: registry(ctx))
    if trackers:
        from hica_bench.tracking import check_name

        experiment = check_name(experiment if experiment is not None else
                                (suite.stem if suite is not None else settings.out_dir.resolve().name), "--experiment")
        # the extra is installed and the server answers, before any cell runs
        trackers = [target.prepare(settings.out_dir) for target in trackers]
    with out_lock(settings.out_dir):  # the loop and the publishing of its results, one run at a time per --out
        if quiet:
            summary = runner.run(grid, settings, registry(ctx))
        else:  # a live display on a terminal; timestamped lines in a log (CI, Slurm), at least one a minute
            with (LiveEvents(console) if console.is_terminal else LogEvents()) as events:
                summary = runner.run(grid, settings, registry(ctx), events)
        published = publish.publish(settings.out_dir, report=settings.report)
        print_summary(summary, settings, published)
        if trackers:  # after the results are written and published (a tracker that fails loses none of them), under
            from hica_bench.results import read_many_with_files  # the lock (two trackings never race on one store)

            track_results(trackers, read_many_with_files([settings.out_dir / "results.jsonl"]), experiment)
    if summary.failed:
        raise typer.Exit(1)


def print_summary(summary, settings, published) -> None:
    out = Console()
    for line in summary.datasets:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if summary.extractions:
        table = Table(title="encoder passes (one per dataset and split)")
        for column in ("dataset", "split", "images", "source", "seconds", "images/s"):
            table.add_column(column)
        for e in summary.extractions:
            rate = e.images_per_s
            table.add_row(escape(e.dataset), e.split, str(e.n_images), "cache" if e.cached else f"encoder ({settings.device})",
                          f"{e.seconds:.1f}", f"{rate:.1f}" if rate else "—")
        out.print(table)
    for label, tuning in summary.tuning.items():
        prefix = f"extraction ({label})" if len(summary.tuning) > 1 else "extraction"
        out.print(f"{prefix}: {tuning.describe()}", markup=False, highlight=False)
    for label in summary.random_init:
        out.print(f"encoder {label}: random init (asked for by name): these are not the numbers of trained weights",
                  markup=False)
    shard = (f" (shard {settings.shard[0]}/{settings.shard[1]}; {summary.other_shards} in the other shards)"
             if settings.shard else "")
    out.print(
        f"cells: {summary.total} in grid{shard}, {summary.skipped} already finished, {summary.ok} ran ok, "
        f"{summary.not_applicable} not applicable, {summary.failed} failed", markup=False
    )
    if summary.executor != "in-process":
        out.print(f"executor: {summary.executor}", markup=False, highlight=False)
    out.print(f"feature cache: {summary.cache_hits} hits, {summary.cache_misses} misses "
              f"(encoder seconds: {sum(e.seconds for e in summary.extractions):.1f})")
    for failure in summary.failures:
        out.print(f"[red]failed:[/] {escape(failure)}", highlight=False)
    out.print(f"wall time: {summary.wall_s:.1f} s")
    if published.leaderboard:
        md_path, csv_path = published.leaderboard
        out.print(f"results: {settings.out_dir / 'results.jsonl'}\nleaderboard: {md_path}, {csv_path}", markup=False)
    if published.report:
        out.print(f"report: {published.report}", markup=False)
