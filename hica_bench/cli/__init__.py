"""The ``hica-bench`` command line: thin typer commands, one module per command, composing the core.

Exit codes: 0 all cells finished, 1 some cells failed, 2 bad input (one line on stderr, no traceback).
Text that comes from users or plugins (names, options, reasons, paths) is printed without rich markup, so
``[brackets]`` in it are shown as they are.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys

import typer

try:
    from typer._click.exceptions import ClickException  # newer typer vendors its own click
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import ClickException

from hica_bench.startup import collection_paused

with collection_paused():  # the commands' modules import the core and pandas (hica_bench.startup)
    # each command registers itself on the app when imported; this order is the order of `hica-bench --help`
    from hica_bench.cli import (run, listing, leaderboard, merge, report, download, explain, bench, check,  # noqa: E402,F401
                                track, bundle, history)
    from hica_bench.cli.app import app
from hica_bench.errors import Interrupted, UserError

__all__ = ["app", "main"]


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
    except SystemExit as exc:  # the commands never raise it (typer.Exit is click's): plugin code called sys.exit
        _error(f"error: plugin code called sys.exit({' '.join(repr(exc.code).split())[:80]}) outside a cell; finished "
               "cells are kept in the results file (rerun the same command to resume)")
        return 1
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
