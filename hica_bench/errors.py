"""Errors a user can cause. The CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (names, options, files). The message says what to do about it."""


class NotApplicable(Exception):
    """Raised by ``Method.fit`` when the method cannot run on this task (e.g. zero-shot with an
    unaligned encoder pair). The runner records the cell as ``not_applicable`` with this reason."""
