"""``hica-bench explain``: one cell's predictions explained (maps, regions, faithfulness), then published."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hica_bench.cli.app import (BACKEND_OPTION, BATCH_SIZE_OPTION, CACHE_DIR_OPTION, DATA_ROOT_OPTION, DEVICE_OPTION,
                                DOWNLOAD_OPTION, ENCODER_OPTION, SIZE_OPTION, app, registry, requested_extraction)
from hica_bench.errors import UserError
from hica_bench.suite import int_list, name_list


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
    data_root: Optional[str] = DATA_ROOT_OPTION,
    cache_dir: Optional[str] = CACHE_DIR_OPTION,
    out: Path = typer.Option(..., help="Folder for explanations/<cell>/ (a run's --out: its report then shows them)."),
    download: bool = DOWNLOAD_OPTION,
) -> None:
    """Explain one cell's predictions on chosen test images: occlusion maps (any method), Grad-CAM maps (methods with
    a differentiable head), HiCA's regions with their best-matching descriptors, and deletion/insertion AUCs."""
    from hica_bench import data, devices, explain, explanations, plan, publish

    if images is not None and indices is not None:
        raise UserError("give --images or --indices, not both")
    index_list = int_list(indices, "--indices") if indices is not None else None
    plugins = registry(ctx)

    def one(kind: str, text: str, option: str) -> list:
        names = name_list(text, option)
        if len(names) > 1:
            raise UserError(f"explain explains one cell: {option} takes one name, got {len(names)} ({text})")
        return plan.choose_each(plugins, kind, names, option)

    grid = plan.Grid(
        datasets=one("dataset", dataset, "--dataset"), methods=one("method", method, "--method"),
        encoders=one("encoder", encoder if encoder is not None else plan.default_names(plugins, "encoder", "--encoder"),
                     "--encoder"),
        shots=[k], seeds=[seed], size=size)
    settings = plan.Settings(device=devices.resolve_device(device),
                             extraction=requested_extraction(backend, batch_size, None, 0, True, False),
                             data_root=data.data_root(data_root), cache_dir=data.cache_root(cache_dir),
                             out_dir=data.writable_dir(out, "--out folder"), download=download)
    path, found = explain.explain_cell(grid, settings, plugins, images, index_list)
    if (settings.out_dir / "results.jsonl").is_file():  # a run's folder: its report again, with the explanations
        publish.publish(settings.out_dir, tables=False)
    table = Table(title=f"faithfulness over {found['images']} images (patches removed or inserted in map order; "
                        "deletion: lower is better, insertion: higher)")
    for column in ("attribution", "deletion AUC", "insertion AUC", "paired vs random order (Wilcoxon p)"):
        table.add_column(column)
    for row in found["summary"]:
        table.add_row(escape(row["attribution"]), explanations.mean_se(row["deletion_auc"], row["deletion_auc_se"]),
                      explanations.mean_se(row["insertion_auc"], row["insertion_auc_se"]), escape(explanations.versus_random(row)))
    out_console = Console()
    out_console.print(table)
    for name, why in found["unavailable"].items():
        out_console.print(f"{escape(name)}: not computed ({escape(why)})", highlight=False, soft_wrap=True)
    print(f"written: {path.parent}")
