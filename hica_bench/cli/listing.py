"""``hica-bench list``: the installed plugins of every kind."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hica_bench.cli.app import app, registry
from hica_bench.interfaces import KINDS, SpecError


@app.command("list")
def list_(ctx: typer.Context, kind: Optional[str] = typer.Argument(None, help=f"One of: {', '.join(KINDS)}.")) -> None:
    """Show the installed plugins: name, kind, distribution, version, options, description."""
    from hica_bench.registry import kind_named

    kinds = [kind_named(kind)] if kind is not None else list(KINDS)
    plugins = registry(ctx)
    table = Table(caption="* in the default suite (what `hica-bench run` runs when none is named)")
    for column in ("name", "kind", "distribution", "version", "options", "description"):
        table.add_column(column, overflow="fold")
    for k in kinds:
        for name, reg in sorted(plugins.specs(k).items()):
            try:
                options = " ".join(f"{key}={value}" + (f" ({reg.spec.constraints[key].describe()})"
                                                        if key in reg.spec.constraints else "")
                                   for key, value in reg.spec.options.items())
            except SpecError as exc:  # a factory named by string that does not import: the row says so, the rest list
                options = f"unavailable: {exc.problem}"
            shown = name + (" *" if reg.spec.in_default_suite else "")
            table.add_row(*(escape(text) for text in (shown, k, reg.distribution, reg.version, options,
                                                      reg.spec.description.split("\n")[0])))
    Console(width=200).print(table)
