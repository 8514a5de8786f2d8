"""Run a noisy library call quietly.

A failed dynamo ONNX export prints the whole ATen graph (thousands of lines for a real network) from
Python and from native code before raising; ``quiet()`` sends all of it to a discarded file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

__all__ = ["quiet"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a call: its warnings, its logging, and whatever it prints (from Python or native code).

    Exceptions pass through: the caller keeps the reason and says it in one line.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), _silenced_output():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """Send what is written to stdout and stderr, by Python or by native code, to a discarded file."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no file descriptors to redirect (an embedded interpreter)
            yield
            return
        with tempfile.TemporaryFile() as sink:
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                for stream in (sys.__stdout__, sys.__stderr__):
                    if stream is not None:
                        stream.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
