"""The ``hica-bench`` typer application, its global options, and what every command shares: the run's plugin
registry, the options several commands take (defined once, so they mean the same thing everywhere), and the
console for messages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from hica_bench import __version__
from hica_bench.suite import name_list

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are shown as written: "[default: $HICA_BENCH_DATA]" keeps its brackets
    help="Benchmark few-shot medical image classification methods built on vision-language models.",
)
console = Console(stderr=True)


# Options several commands share, defined once so every command means the same thing by them.
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
DATA_ROOT_OPTION = typer.Option(None, help="Folder with the dataset files [default: $HICA_BENCH_DATA, else the dataset's own default].")
CACHE_DIR_OPTION = typer.Option(None, help="Feature cache folder [default: $HICA_BENCH_CACHE, else ~/.cache/hica-bench].")
RESULTS_ARGUMENT_HELP = ("Results files written by `hica-bench run`, or folders holding one; several are merged (a cell in "
                         "two of them is refused).")


def requested_extraction(backend: str, batch_size: int, channels_last: Optional[bool], threads: int, amp: bool,
                         compile: bool):
    """The extraction knobs the user fixed (0 / None = choose by measurement), validated by ``Requested`` itself."""
    from hica_bench.extraction import Requested

    return Requested(backend=backend, batch_size=batch_size, channels_last=channels_last, threads=threads, amp=amp,
                     compile=compile)


def registry(ctx: typer.Context):
    """The command's plugin registry (loaded once, with the ``-p`` modules); each plugin that failed to load is one
    warning line."""
    from hica_bench.registry import load_registry

    if ctx.obj is None:
        ctx.obj = load_registry(ctx.find_root().params.get("plugin") or [])
        ctx.obj.specs("method")  # calls every plugin's hooks, so load_errors is complete
        for problem in ctx.obj.load_errors:
            console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    return ctx.obj


class StderrHandler(logging.Handler):
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
                        handlers=[StderrHandler(one_line=not verbose)], force=True)
    if plugins_only is not None:
        from hica_bench.registry import ALLOW_ENV

        name_list(plugins_only, "--plugins-only")  # checks it names something, nothing twice
        os.environ[ALLOW_ENV] = plugins_only  # bench's worker processes build their registries with the same allow-list
