"""``hica-bench bench``: encoder throughput, naive eager to the harness, measured in one run (:mod:`hica_bench.bench`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from hica_bench.cli.app import (AMP_OPTION, BACKEND_OPTION, BATCH_SIZE_OPTION, CHANNELS_LAST_OPTION, COMPILE_OPTION,
                                DEVICE_OPTION, DOWNLOAD_OPTION, ENCODER_OPTION, SIZE_OPTION, THREADS_OPTION, app, console,
                                registry, requested_extraction)
from hica_bench.errors import UserError
from hica_bench.files import atomic_write


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
    warmup: int = typer.Option(1, help="Untimed forward passes before each timed segment of each variant."),
    repeats: int = typer.Option(5, help="Repeats (each variant once per repeat, in turns); medians over them are reported."),
    data_root: Optional[str] = typer.Option(None, help="Folder with the dataset files [default: $HICA_BENCH_DATA]."),
    cache_dir: Optional[str] = typer.Option(None, help="Tuning, ONNX exports and scratch (throw-away feature caches) [default: $HICA_BENCH_CACHE]."),
    download: bool = DOWNLOAD_OPTION,
    out: Path = typer.Option(Path("hica-bench-bench.json"), help="JSON file for the report."),
) -> None:
    """Encoder throughput: naive eager, tuned eager, ONNX Runtime and the harness's extraction, as img/s, × naive
    and GFLOP/s against a matmul ceiling, measured in one run (one worker process per variant, in turns)."""
    import json

    from hica_bench import bench, data, devices, plan

    extraction = requested_extraction(backend, batch_size, channels_last, threads, amp, compile)
    if split not in ("train", "val", "test"):
        raise UserError(f"--split must be train, val or test, got {split!r}")
    data.check_size(size)
    bench.check_counts(images, repeats, naive_batch_size, warmup)
    plugins = registry(ctx)
    encoder = encoder if encoder is not None else plan.default_names(plugins, "encoder", "--encoder")
    dataset = dataset if dataset is not None else plan.default_names(plugins, "dataset", "--dataset").split(",")[0]
    dataset_choice, encoder_choice = plugins.choose("dataset", dataset), plugins.choose("encoder", encoder)
    resolved = devices.resolve_device(device)
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
