"""The one exception type a user is meant to see."""

from __future__ import annotations


class PeftkitError(Exception):
    """A problem the user can fix.

    The CLI prints it as ``peftkit: error: <what> (<where>): <fix>`` on one line and
    exits with code 2. Raise it at the boundary where input is checked, with enough
    context that the user knows what to change.

    Args:
        what: what is wrong, in a few words.
        where: the file, key or object the problem is in (optional).
        fix: how to fix it (optional).
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f": {self.fix}"
        return " ".join(text.split())  # always one line


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training; a checkpoint was written first.

    The CLI prints the message (which says how to resume) and exits with ``code``
    (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
