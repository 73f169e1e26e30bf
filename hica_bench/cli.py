"""The ``hica-bench`` command line: thin typer commands over the core modules.

Exit codes: 0 all cells finished, 1 some cells failed, 2 bad input (one line on stderr, no traceback).
Text that comes from users or plugins (names, options, reasons, paths) is printed without rich markup, so
``[brackets]`` in it are shown as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

try:
    from typer._click.exceptions import ClickException  # newer typer vendors its own click
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import ClickException

from hica_bench import __version__
from hica_bench.errors import Interrupted, UserError
from hica_bench.files import atomic_write
from hica_bench.interfaces import KINDS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are shown as written: "[default: $HICA_BENCH_DATA]" keeps its brackets
    help="Benchmark few-shot medical image classification methods built on vision-language models.",
)
console = Console(stderr=True)


# Options `run` and `bench` share, defined once so both commands mean the same thing by them.
ENCODER_OPTION = typer.Option(None, help="Encoder pair, NAME or NAME:opt=value (see `hica-bench list encoder`) "
                                         "[default: the one the installed plugins declare as default].")
SIZE_OPTION = typer.Option(28, help="Image size of the dataset files (MedMNIST: 28, 64, 128, 224).")
DEVICE_OPTION = typer.Option("auto", help="auto, cpu or cuda[:N].")
BACKEND_OPTION = typer.Option("auto", help="Encoder backend: eager (PyTorch), onnxruntime (needs hica-bench[onnx]; CPU), "
                                                 "or auto = the faster of those that can run this encoder, by measurement.")
BATCH_SIZE_OPTION = typer.Option(0, help="Encoder batch size; 0 = choose by measurement (remembered per encoder and device).")
CHANNELS_LAST_OPTION = typer.Option(None, "--channels-last/--no-channels-last", show_default=False,
                                    help="Eager backend: image model and input in channels-last memory format [default: by measurement].")
THREADS_OPTION = typer.Option(0, help="CPU threads for the encoder; 0 = choose by measurement.")
COMPILE_OPTION = typer.Option(False, help="Eager backend: run the encoder through torch.compile (compiles once per run).")
AMP_OPTION = typer.Option(True, help="Mixed precision (bf16/fp16) for the encoder on CUDA; ignored on CPU.")
DOWNLOAD_OPTION = typer.Option(True, help="Download missing dataset files.")


def requested_extraction(backend: str, batch_size: int, channels_last: Optional[bool], threads: int, amp: bool,
                         compile: bool):
    """The extraction knobs the user fixed (0 / None = choose by measurement), validated by ``Requested`` itself."""
    from hica_bench.extraction import Requested

    return Requested(backend=backend, batch_size=batch_size, channels_last=channels_last, threads=threads, amp=amp,
                     compile=compile)


def default_suite(registry, kind: str, option: str) -> str:
    """The names of ``kind`` the installed plugins declare as the default suite (comma list), for an option left out."""
    from hica_bench.registry import plural

    names = registry.default_suite(kind)
    if not names:
        raise UserError(f"no installed plugin declares a default {kind}; name {plural(kind)} with {option}")
    if kind == "encoder" and len(names) > 1:
        raise UserError(f"installed plugins declare {len(names)} default encoders ({', '.join(names)}); choose one with --encoder")
    return ",".join(names)


def _registry(ctx: typer.Context):
    from hica_bench.registry import load_registry

    if ctx.obj is None:
        ctx.obj = load_registry(ctx.find_root().params.get("plugin") or [])
        ctx.obj.specs("method")  # calls every plugin's hooks, so load_errors is complete
        for problem in ctx.obj.load_errors:
            console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    return ctx.obj


class _StderrHandler(logging.Handler):
    """Log lines to whatever ``sys.stderr`` is when they are emitted: one line each (with ``-v`` as they are,
    tracebacks of failed cells included)."""

    def __init__(self, one_line: bool = True) -> None:
        super().__init__()
        self.one_line = one_line

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with contextlib.suppress(OSError):
            print(" ".join(text.split()) if self.one_line else text, file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        print(f"hica-bench {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    plugin: List[str] = typer.Option([], "-p", "--plugin", help="Import MODULE and register it as a plugin (repeatable), as pytest's -p."),
    plugins_only: Optional[str] = typer.Option(
        None, "--plugins-only", metavar="DISTS",
        help="Load entry-point plugins only from these distributions (comma list) [default: $HICA_BENCH_PLUGINS, else all]."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log debug details (e.g. tracebacks of failed cells)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s",
                        handlers=[_StderrHandler(one_line=not verbose)], force=True)
    if plugins_only is not None:
        from hica_bench.registry import ALLOW_ENV

        name_list(plugins_only, "--plugins-only")  # checks it names something, nothing twice
        os.environ[ALLOW_ENV] = plugins_only  # bench's worker processes build their registries with the same allow-list


def int_list(text: str, option: str) -> list[int]:
    """``"1,5,20"`` -> [1, 5, 20] (order kept, duplicates dropped)."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{option} takes comma-separated whole numbers like 1,5,20; got {text!r}") from None
        if value not in values:
            values.append(value)
    return values


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4): shard 1 of 4, numbered from 0 (a Slurm array's ``$SLURM_ARRAY_TASK_ID`` with --array=0-3)."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/4 (shard I of N, from 0); got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: I must be 0 to N-1 and N >= 1")
    return i, n


def name_list(text: str, option: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise UserError(f"{option} takes a comma-separated list of names; got {text!r}")
    if len(set(names)) != len(names):
        raise UserError(f"{option} names something twice: {text!r}")
    return names


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
    shots: Optional[str] = typer.Option(None, help="Comma list of shots per class [default: the suite's, else 1,5,20]."),
    seeds: Optional[str] = typer.Option(None, help="Comma list of seeds [default: the suite's, else 0-9]."),
    size: Optional[int] = typer.Option(None, help="Image size of the dataset files (MedMNIST: 28, 64, 128, 224) "
                                                  "[default: the suite's, else 28]."),
    corruptions: Optional[str] = typer.Option(None, help="Robustness track: also run every dataset with its test split "
                                              "corrupted (MedMNIST-C's corruptions for the dataset; supports stay clean): "
                                              "all, or a comma list of names (see the README) [default: the suite's, else none]."),
    severities: Optional[str] = typer.Option(None, help="With --corruptions: comma list of severities 1-5 "
                                             "[default: the suite's, else 1,2,3,4,5]."),
    slice_axis: str = typer.Option("0", help="3D datasets with a 2D encoder: encode each volume's slices along axis 0, "
                                   "1 or 2 of (D, H, W), or along all three (planes); part of the feature identity."),
    slice_pool: str = typer.Option("mean", help="3D datasets with a 2D encoder: pool a volume's slice features by "
                                   "their mean or element-wise max; part of the feature identity."),
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    channels_last: Optional[bool] = CHANNELS_LAST_OPTION,
    threads: int = THREADS_OPTION,
    compile: bool = COMPILE_OPTION,
    amp: bool = AMP_OPTION,
    data_root: Optional[str] = typer.Option(None, help="Folder with the dataset files [default: $HICA_BENCH_DATA, else the dataset's own default]."),
    cache_dir: Optional[str] = typer.Option(None, help="Feature cache folder [default: $HICA_BENCH_CACHE, else ~/.cache/hica-bench]."),
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
) -> None:
    """Run the grid datasets × methods × shots × seeds and write results and leaderboards to --out."""
    from hica_bench import data, runner
    from hica_bench.suite import Suite, load

    given = load(suite) if suite is not None else Suite()  # a flag given here overrides the suite's value
    shot_list = int_list(shots, "--shots") if shots is not None else given.shots or [1, 5, 20]
    seed_list = int_list(seeds, "--seeds") if seeds is not None else given.seeds or list(range(10))
    extraction = requested_extraction(backend, batch_size, channels_last, threads, amp, compile)
    if cell_timeout is not None and not 0 < cell_timeout < float("inf"):
        raise UserError(f"--cell-timeout must be a positive number of seconds, got {cell_timeout}")
    if executor not in ("in-process", "ray"):
        raise UserError(f"--executor must be in-process or ray, got {executor!r}")
    if executor != "ray" and (ray_address is not None or workers is not None):
        raise UserError(f"{'--ray-address' if ray_address is not None else '--workers'} needs --executor ray")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    shard_of = parse_shard(shard) if shard is not None else None
    registry = _registry(ctx)

    def each(kind: str, flag: Optional[str], from_suite: Optional[list[str]], option: str) -> list:
        if flag is None and from_suite:
            return _choose_each(registry, kind, from_suite, f"suite {suite} {option.lstrip('-')}")
        return _choose_each(registry, kind, name_list(flag if flag is not None else default_suite(registry, kind, option),
                                                      option), option)

    dataset_choices = each("dataset", datasets, given.datasets, "--datasets")
    from hica_bench.corruptions import variants
    from hica_bench.volumes import VolumeOptions

    VolumeOptions(slice_axis, slice_pool)  # checked before anything runs

    corruption_names = name_list(corruptions, "--corruptions") if corruptions is not None else given.corruptions
    severity_list = int_list(severities, "--severities") if severities is not None else given.severities
    if skip_bad_images:  # the option of every dataset that declares it
        dataset_choices = [dataclasses.replace(c, options={**c.options, "skip_bad_images": True})
                           if "skip_bad_images" in c.registered.spec.options else c for c in dataset_choices]
    grid = runner.Grid(
        datasets=variants(dataset_choices, corruption_names, severity_list),
        methods=each("method", methods, given.methods, "--methods"),
        encoders=each("encoder", encoders, given.encoders, "--encoders"),
        shots=shot_list,
        seeds=seed_list,
        size=size if size is not None else given.size or 28,
        max_test=max_test if max_test is not None else given.max_test,
    )
    for method in grid.methods:  # option values its constructor rejects, or needs it cannot declare, are bad input
        try:
            built = method.build()
        except UserError:
            raise
        except (Exception, SystemExit):  # a broken constructor is the plugin's fault: its cells record it and fail
            continue
        try:
            runner.validate_needs(getattr(built, "needs", None))
        except ValueError as exc:
            raise UserError(f"method {method.label}: {exc}") from None
    resolved = runner.resolve_device(device)
    out_dir = out if out is not None else Path(given.out or "hica-bench-results")
    if shard_of is not None:  # each shard its own results file (and lock): `hica-bench merge` combines them
        out_dir = out_dir / f"shard-{shard_of[0]}-of-{shard_of[1]}"
    out_dir = data.writable_dir(out_dir, "--out folder")
    for name in ("leaderboard.md", "leaderboard.csv"):  # written after the grid: a folder in the way is found now
        data.writable_file(out_dir / name, "leaderboard file")
    settings = runner.Settings(
        device=resolved,
        extraction=extraction,
        data_root=data.data_root(data_root),
        cache_dir=data.cache_root(cache_dir),
        out_dir=out_dir,
        download=download,
        cell_timeout=cell_timeout,
        force=force,
        save_predictions=save_predictions,
        report=report,
        executor=executor,
        ray_address=ray_address,
        workers=workers,
        shard=shard_of,
        volume=VolumeOptions(slice_axis, slice_pool),
    )
    from hica_bench.progress import LiveEvents, LogEvents

    if quiet:
        summary = runner.run(grid, settings, registry)
    else:  # a live display on a terminal; timestamped lines in a log (CI, Slurm), at least one a minute
        with (LiveEvents(console) if console.is_terminal else LogEvents()) as events:
            summary = runner.run(grid, settings, registry, events)
    _print_summary(summary, settings)
    if summary.failed:
        raise typer.Exit(1)


def _print_summary(summary, settings) -> None:
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
    if summary.leaderboard:
        md_path, csv_path = summary.leaderboard
        out.print(f"results: {settings.out_dir / 'results.jsonl'}\nleaderboard: {md_path}, {csv_path}", markup=False)
    if summary.report:
        out.print(f"report: {summary.report}", markup=False)


@app.command("list")
def list_(ctx: typer.Context, kind: Optional[str] = typer.Argument(None, help=f"One of: {', '.join(KINDS)}.")) -> None:
    """Show the installed plugins: name, kind, distribution, version, options, description."""
    from hica_bench.registry import kind_named

    kinds = [kind_named(kind)] if kind is not None else list(KINDS)
    registry = _registry(ctx)
    table = Table(caption="* in the default suite (what `hica-bench run` runs when none is named)")
    for column in ("name", "kind", "distribution", "version", "options", "description"):
        table.add_column(column, overflow="fold")
    for k in kinds:
        for name, reg in sorted(registry.specs(k).items()):
            options = " ".join(f"{key}={value}" + (f" ({reg.spec.constraints[key].describe()})" if key in reg.spec.constraints
                                                    else "") for key, value in reg.spec.options.items())
            shown = name + (" *" if reg.spec.in_default_suite else "")
            table.add_row(*(escape(text) for text in (shown, k, reg.distribution, reg.version, options,
                                                      reg.spec.description.split("\n")[0])))
    Console(width=200).print(table)


@app.command("leaderboard")
def leaderboard_(
    results: List[Path] = typer.Argument(..., help="Results files written by `hica-bench run`, or folders holding one; "
                                                   "several are merged (a cell in two of them is refused)."),
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
    from hica_bench import data, leaderboard
    from hica_bench.results import merge_shards, results_files

    out = data.writable_dir(out, "--out folder")
    target = out / "results.jsonl"
    if target.exists() and target.resolve() not in {p.resolve() for p in results_files(results)}:
        raise UserError(f"{target} exists and is not among the files to merge; add it to them or use another --out")
    merged, dropped = merge_shards(results, out)
    if not merged:
        raise UserError(f"{', '.join(map(str, results))} hold no results")
    atomic_write(target, "".join(r.to_json() + "\n" for r in merged))
    md_path, csv_path = leaderboard.write(merged, out)
    print(f"merged {len(results)} results files: {len(merged)} cells ({dropped} duplicate records dropped)")
    print(f"written: {target}, {md_path}, {csv_path}")
    if report and any(r.status.value == "ok" for r in merged):
        from hica_bench import report as report_module

        page = report_module.write(merged, out, folders={r.cell_id: out for r in merged}, sources=[str(target)], svg=False)
        print(f"report: {page}")


@app.command("report")
def report_(
    results: List[Path] = typer.Argument(..., help="Results files written by `hica-bench run`, or folders holding one; "
                                                   "several are merged (a cell in two of them is refused)."),
    out: Path = typer.Option(..., help="Folder for report.html, its figures (PNG and SVG) and the CSVs of the tests."),
    reference: Optional[str] = typer.Option(None, help="Method the paired tests compare every other method with "
                                                       "[default: linear-probe, when it has results]."),
    bootstrap: int = typer.Option(0, help="Also a test-set bootstrap interval of ACC per seed with this many resamples "
                                          "(needs predictions saved with `run --save-predictions`); 0: none."),
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
                        [str(p) for p in results])
    print(f"written: {page}")


@app.command("download")
def download_(
    ctx: typer.Context,
    datasets: str = typer.Argument(..., help="Comma list of datasets (see `hica-bench list dataset`)."),
    size: int = SIZE_OPTION,
    data_root: Optional[str] = typer.Option(None, help="Folder to put the files in (created if missing) [default: "
                                                       "$HICA_BENCH_DATA, else the dataset's own default]."),
) -> None:
    """Fetch dataset files before a run (each dataset plugin's own downloader; MedMNIST: the official record, with
    its MD5 checked and a progress bar). Files already there are checked and kept."""
    from hica_bench import data, runner

    data.check_size(size)
    registry = _registry(ctx)
    choices = _choose_each(registry, "dataset", name_list(datasets, "DATASETS"), "DATASETS")
    given = data_root or os.environ.get(data.DATA_ENV)
    if given:
        data.writable_dir(Path(given).expanduser(), "--data-root")
    root = data.data_root(data_root)
    cache = data.cache_root(None)
    for choice in choices:
        dataset = choice.build(root=root, size=size, download=True, cache_dir=cache)
        print(f"{choice.label} ({size} px): ready, {dataset.identity}")
        print(runner.describe_dataset(choice.label, dataset))


@app.command("explain")
def explain_(
    ctx: typer.Context,
    dataset: str = typer.Option(..., help="The cell's dataset, NAME or NAME:opt=value (see `hica-bench list dataset`)."),
    method: str = typer.Option(..., help="The cell's method, NAME or NAME:opt=value (see `hica-bench list method`)."),
    encoder: Optional[str] = ENCODER_OPTION,
    k: int = typer.Option(..., "--k", help="Shots per class of the cell."),
    seed: int = typer.Option(..., help="Seed of the cell (its support set and the method's draws)."),
    images: Optional[int] = typer.Option(None, help="Explain the first N test images [default: 8]."),
    indices: Optional[str] = typer.Option(None, help="Explain these test images instead (comma list of indices)."),
    size: int = SIZE_OPTION,
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    data_root: Optional[str] = typer.Option(None, help="Folder with the dataset files [default: $HICA_BENCH_DATA, else the dataset's own default]."),
    cache_dir: Optional[str] = typer.Option(None, help="Feature cache folder [default: $HICA_BENCH_CACHE, else ~/.cache/hica-bench]."),
    out: Path = typer.Option(..., help="Folder for explanations/<cell>/ (a run's --out: its report then shows them)."),
    download: bool = DOWNLOAD_OPTION,
) -> None:
    """Explain one cell's predictions on chosen test images: occlusion maps (any method), Grad-CAM maps (methods with
    a differentiable head), HiCA's regions with their best-matching descriptors, and deletion/insertion AUCs."""
    from hica_bench import data, explain, runner

    if images is not None and indices is not None:
        raise UserError("give --images or --indices, not both")
    index_list = int_list(indices, "--indices") if indices is not None else None
    registry = _registry(ctx)
    def one(kind: str, text: str, option: str) -> list:
        names = name_list(text, option)
        if len(names) > 1:
            raise UserError(f"explain explains one cell: {option} takes one name, got {len(names)} ({text})")
        return _choose_each(registry, kind, names, option)

    grid = runner.Grid(
        datasets=one("dataset", dataset, "--dataset"), methods=one("method", method, "--method"),
        encoders=one("encoder", encoder if encoder is not None else default_suite(registry, "encoder", "--encoder"),
                     "--encoder"),
        shots=[k], seeds=[seed], size=size)
    settings = runner.Settings(device=runner.resolve_device(device),
                               extraction=requested_extraction(backend, batch_size, None, 0, True, False),
                               data_root=data.data_root(data_root), cache_dir=data.cache_root(cache_dir),
                               out_dir=data.writable_dir(out, "--out folder"), download=download)
    path, found = explain.explain_cell(grid, settings, registry, images, index_list)
    table = Table(title=f"faithfulness over {found['images']} images (patches removed or inserted in map order; "
                        "deletion: lower is better, insertion: higher)")
    for column in ("attribution", "deletion AUC", "insertion AUC", "paired vs random order (Wilcoxon p)"):
        table.add_column(column)
    for row in found["summary"]:
        table.add_row(escape(row["attribution"]), explain.mean_se(row["deletion_auc"], row["deletion_auc_se"]),
                      explain.mean_se(row["insertion_auc"], row["insertion_auc_se"]), escape(explain.versus_random(row)))
    out_console = Console()
    out_console.print(table)
    for name, why in found["unavailable"].items():
        out_console.print(f"{escape(name)}: not computed ({escape(why)})", highlight=False, soft_wrap=True)
    print(f"written: {path.parent}")


@app.command("bench")
def bench_(
    ctx: typer.Context,
    encoder: str = ENCODER_OPTION,
    dataset: Optional[str] = typer.Option(None, help="Dataset whose images are encoded [default: the first of the "
                                                     "installed plugins' default suite]."),
    split: str = typer.Option("train", help="Split to take the images from (train, val or test)."),
    size: int = SIZE_OPTION,
    device: str = DEVICE_OPTION,
    backend: str = BACKEND_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    channels_last: Optional[bool] = CHANNELS_LAST_OPTION,
    threads: int = THREADS_OPTION,
    compile: bool = COMPILE_OPTION,
    amp: bool = AMP_OPTION,
    naive_batch_size: int = typer.Option(64, help="Batch size of naive eager (CLIP_benchmark's default)."),
    images: int = typer.Option(128, help="Images every variant encodes per repeat (the first N of the split)."),
    warmup: int = typer.Option(1, help="Untimed forward passes per variant before timing."),
    repeats: int = typer.Option(5, help="Repeats (each variant once per repeat, in turns); medians over them are reported."),
    data_root: Optional[str] = typer.Option(None, help="Folder with the dataset files [default: $HICA_BENCH_DATA]."),
    cache_dir: Optional[str] = typer.Option(None, help="Tuning, ONNX exports and scratch (throw-away feature caches) [default: $HICA_BENCH_CACHE]."),
    download: bool = DOWNLOAD_OPTION,
    out: Path = typer.Option(Path("hica-bench-bench.json"), help="JSON file for the report."),
) -> None:
    """Encoder throughput: naive eager, tuned eager, ONNX Runtime and the harness's extraction, as img/s, × naive
    and GFLOP/s against a matmul ceiling, measured in one run (one worker process per variant, in turns)."""
    import json

    from hica_bench import data, runner
    from hica_bench.extraction import bench

    extraction = requested_extraction(backend, batch_size, channels_last, threads, amp, compile)
    if split not in ("train", "val", "test"):
        raise UserError(f"--split must be train, val or test, got {split!r}")
    data.check_size(size)
    bench.check_counts(images, repeats, naive_batch_size, warmup)
    registry = _registry(ctx)
    encoder = encoder if encoder is not None else default_suite(registry, "encoder", "--encoder")
    dataset = dataset if dataset is not None else default_suite(registry, "dataset", "--dataset").split(",")[0]
    dataset_choice, encoder_choice = registry.choose("dataset", dataset), registry.choose("encoder", encoder)
    resolved = runner.resolve_device(device)
    scratch = data.cache_root(cache_dir)
    root = data.data_root(data_root)
    built = dataset_choice.build(root=root, size=size, download=download, cache_dir=scratch)  # downloads once, here
    available = len(built.split(split).labels)
    if images > available:
        raise UserError(f"{dataset_choice.label} {split} has {available} images, fewer than --images {images}; lower it")
    out = data.writable_file(out, "--out")
    try:
        report = bench.bench(ctx.find_root().params.get("plugin") or [], encoder, encoder_choice.label, dataset,
                             dataset_choice.label, split, size, images, resolved, root, scratch, extraction,
                             naive_batch_size, warmup, repeats,
                             log=lambda line: console.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True))
    except bench.WorkerFailed as exc:  # a crash, not bad input: one line, exit 1
        print(f"hica-bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise typer.Exit(1) from None
    atomic_write(out, json.dumps(report, indent=1) + "\n")
    stdout = Console(width=160)
    bench.print_report(report, stdout)
    stdout.print(f"written: {out}", markup=False, highlight=False)


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


def _choose_each(registry, kind: str, names: list[str], option: str) -> list:
    """``names`` (of ``option`` or a suite) as choices of ``kind``; two spellings of one thing (``prototype`` and
    ``prototype:temperature=0.05``, its default) would run every cell twice, and are refused."""
    chosen, spelled = [], {}
    for name in names:
        choice = registry.choose(kind, name)
        if choice.label in spelled:
            raise UserError(f"{option} names {choice.label} twice: {spelled[choice.label]!r} and {name!r} are the same "
                            "(options at their defaults are left out)")
        spelled[choice.label] = name
        chosen.append(choice)
    return chosen


class _GuardedStdout:
    """Standard output that goes on when its reader went away (``hica-bench list | head -1``, a closed log pipe):
    from the first BrokenPipeError on, what is written goes to /dev/null, so the command (a run, the report
    ``check`` writes) finishes its work and exits with its own code instead of a traceback or typer's exit 1."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _closed(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the stream's own fd now leads to /dev/null (its buffer too)
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self):
        try:
            return self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _signals_and_stdout():
    """SIGINT and SIGTERM raise :class:`Interrupted` (before typer can turn Ctrl-C into a silent exit 130), once: from
    then on both are ignored, so a second Ctrl-C cannot break the one-line exit. Stdout is guarded. Both are restored
    afterwards (``main`` also runs inside test processes)."""
    def interrupted(signum, frame):
        for each in handlers:
            signal.signal(each, signal.SIG_IGN)
        raise Interrupted(signum)

    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[signum] = signal.signal(signum, interrupted)
        except ValueError:  # not the main thread: leave the signals alone
            pass
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        yield
    finally:
        sys.stdout = stdout
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _error(text: str) -> None:
    with contextlib.suppress(OSError):  # stderr gone too: nothing left to tell
        print(f"hica-bench: {' '.join(text.split())}", file=sys.stderr, flush=True)


def _run_app() -> int:
    """The command's exit code, with its one line on stderr for what ends it early."""
    try:
        code = app(standalone_mode=False)  # click's usage errors come here too, to be printed as one line
    except UserError as exc:
        _error(f"error: {exc}")
        return 2
    except ClickException as exc:  # unknown option or command, a value of the wrong type
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            _error(f"error: {exc.format_message()}{where}")
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt, typer.Abort) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        _error(f"interrupted by {signal.Signals(signum).name}; finished cells are kept in the results file "
               "(rerun the same command to resume)")
        return 128 + signum
    return code if isinstance(code, int) else 0


def main() -> None:
    # Transparent huge pages in torch's CPU allocator: ~25 % more encoder throughput on CPU (measured on
    # EfficientNet-Lite0, batch 16, 2 cores); read when torch first allocates, so set before importing it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    with _signals_and_stdout():  # the exit line is printed while the handlers still hold (a second signal is ignored)
        code = _run_app()
    # Everything is written and flushed; leave the objects of the imports (torch, sklearn, matplotlib...) out of the
    # interpreter's last garbage collection, which otherwise takes ~0.5 s at exit. Finalizers and atexit still run.
    gc.freeze()
    sys.exit(code)
