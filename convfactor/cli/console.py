"""Where the command line's messages go, and the exit codes it returns.

Results go to stdout, progress and notes to stderr, and with ``--quiet`` nothing but errors (and
``--json`` documents). Errors are one line: ``one_line`` is the only place that flattens a message.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from .. import errors

__all__ = ["Console", "one_line", "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_USAGE", "EXIT_NOTHING_REPLACED",
           "EXIT_INTERRUPTED"]

# 0 success; 1 the fidelity check (--check) failed (files written); 2 a user error (nothing written);
# 3 the policy replaced no layer (nothing written; the reasons on stderr).
EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_NOTHING_REPLACED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Console:
    """Where messages go: results to stdout, progress and notes to stderr, nothing but errors if quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        # Bars on a terminal; in logs and pipes (where redraws are noise) plain lines with count and ETA.
        self.progress: bool | str = False if quiet else (True if sys.stderr.isatty() else "lines")

    def status(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def result(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def document(self, data: Any) -> None:
        print(json.dumps(data, indent=2, default=str), flush=True)

    def error(self, message: str) -> None:
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def warnings_filtered(self) -> Iterator[None]:
        with warnings.catch_warnings():
            if self.quiet:
                warnings.simplefilter("ignore")
            yield


def one_line(text: str | BaseException) -> str:
    """``text`` on one line (every line joined, whitespace runs collapsed): how errors print."""
    return errors.one_line(text, whole=True)
