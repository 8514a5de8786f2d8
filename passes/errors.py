"""Errors the passes raise for what their caller gave them, as opposed to bugs in a pass.

``run_passes`` lets a ``PassInputError`` through unchanged and wraps anything else in ``PassFailed``.
A library built on the passes derives its own user errors from ``PassInputError`` so they pass too.
"""

from __future__ import annotations

import re

__all__ = ["PassInputError", "CaptureError", "TracedArgumentError", "one_line"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes some libraries put in their messages


class PassInputError(Exception):
    """The input of a pass is wrong (the model, an argument): a user mistake, with a one-line message."""


class CaptureError(PassInputError, RuntimeError):
    """torch.fx could not trace the model; the message names the module, the construct and the way on."""


class TracedArgumentError(PassInputError, ValueError):
    """A captured model was called with a value other than the one an argument was traced with."""


def one_line(what: BaseException | str, *, whole: bool = False, with_type: bool = False) -> str:
    """A message on one line, for an error the user reads.

    Args:
        what: an exception or a text; colour codes are dropped.
        whole: join every line of the text (spaces collapsed) instead of keeping the first one.
        with_type: put the exception's type in front (``"KeyError: 'x'"``).
    Returns:
        The line; for an empty message, the exception's type name (or ``"unknown error"`` for a text).
    """
    lines = [line.strip() for line in _ANSI.sub("", str(what)).strip().splitlines()]
    text = " ".join(" ".join(lines).split()) if whole else (lines[0] if lines else "")
    if not isinstance(what, BaseException):
        return text or "unknown error"
    name = type(what).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text
