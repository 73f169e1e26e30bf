"""``hica-bench download``: dataset files fetched before a run, by each dataset plugin's own downloader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from hica_bench.cli.app import SIZE_OPTION, app, registry
from hica_bench.suite import name_list


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
    from hica_bench import data, plan

    data.check_size(size)
    choices = plan.choose_each(registry(ctx), "dataset", name_list(datasets, "DATASETS"), "DATASETS")
    given = data_root or os.environ.get(data.DATA_ENV)
    if given:
        data.writable_dir(Path(given).expanduser(), "--data-root")
    root = data.data_root(data_root)
    cache = data.cache_root(None)
    for choice in choices:
        dataset = choice.build(root=root, size=size, download=True, cache_dir=cache)
        print(f"{choice.label} ({size} px): ready, {dataset.identity}")
        print(plan.describe_dataset(choice.label, dataset))
