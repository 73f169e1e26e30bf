"""MkDocs hook: the CLI reference, generated from the commands themselves.

A page holding the line ``<!-- cli-reference -->`` gets, in its place, one section per command of the typer app
``hica_bench.cli:app`` with the help text that ``hica-bench COMMAND --help`` prints, walked recursively, so a
command or option added to the CLI shows up on the next build without editing the docs. It only needs
``hica_bench.cli`` to export ``app`` (a module today; a package of one module per command works the same).
The help is rendered through the command's own context class, so a typer that vendors its own click works
as well as one that uses click, and with or without typer's rich help formatting.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
WIDTH = 100  # columns the help text is wrapped at


def _app():
    try:
        module = importlib.import_module("hica_bench.cli")
    except ImportError:
        # not installed: read it from the checkout this mkdocs.yml belongs to
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        module = importlib.import_module("hica_bench.cli")
    return module.app


def _context(command, name, parent=None):
    return command.context_class(command, info_name=name, parent=parent,
                                 terminal_width=WIDTH, max_content_width=WIDTH)


def _sections(command, ctx, path, level):
    """Markdown for ``command`` and, if it is a group, every visible subcommand below it."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # typer's rich help prints instead of returning
        help_text = command.get_help(ctx) or printed.getvalue()
    help_text = "\n".join(line.rstrip() for line in help_text.splitlines()).strip("\n")
    out = [f"{'#' * level} `{' '.join(path)}`", "", "```text", help_text, "```", ""]
    list_commands = getattr(command, "list_commands", None)
    if list_commands is not None:
        for name in list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            out += _sections(sub, _context(sub, name, ctx), [*path, name], min(level + 1, 4))
    return out


def render() -> str:
    import typer.main

    root = typer.main.get_command(_app())
    return "\n".join(_sections(root, _context(root, "hica-bench"), ["hica-bench"], 2))


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
