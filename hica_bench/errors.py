"""Errors a user can cause, and the two ways a run ends early. The CLI turns each into one line on stderr."""


class UserError(Exception):
    """Bad input from the user (names, options, files), or a file the run cannot read or write (a full disk, no
    permission). The message says what to do about it; the CLI prints it as one line and exits with code 2."""


class NotApplicable(Exception):
    """Raised by ``Method.fit`` when the method cannot run on this task (e.g. zero-shot with an
    unaligned encoder pair). The runner records the cell as ``not_applicable`` with this reason."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (Slurm, Kubernetes) arrived: the run stops where it is. Finished cells are already
    in the results file; the CLI prints one line and exits with 128 + the signal's number (130, 143). A
    ``BaseException``, so that no ``except Exception`` of a cell or a plugin swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: What plugin code may raise that must fail only the plugin (its loading, its spec, its cell) and never end a run in
#: silence: any exception, and also ``SystemExit`` (a plugin calling ``sys.exit``) and ``KeyboardInterrupt`` raised by
#: the plugin itself. A real Ctrl-C or SIGTERM under the CLI arrives as :class:`Interrupted`, which is none of these,
#: so it still stops the run.
PLUGIN_FAULTS = (Exception, SystemExit, KeyboardInterrupt)


def fault_text(exc: BaseException, limit: int = 300) -> str:
    """One line naming a plugin's fault, at most ``limit`` characters: its type and message (for ``SystemExit`` the
    code it asked to exit with)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: called sys.exit({exc.code!r})"[:limit]
    if isinstance(exc, KeyboardInterrupt) and not str(exc):
        return "KeyboardInterrupt raised by the plugin's own code (a real Ctrl-C stops the run)"
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:limit]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (libraries such as torch follow it with
    lines on how to get their internal trace, which a one-line error leaves out)."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]
