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
