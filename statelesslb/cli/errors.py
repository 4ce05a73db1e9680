"""statelesslb-ctl's exit statuses and its one error type."""

from __future__ import annotations

PROG = "statelesslb-ctl"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_TIMEOUT = 15.0


class CtlError(Exception):
    """A failure to report as one line on stderr, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code
