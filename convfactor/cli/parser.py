"""The ``convfactor`` argument parser: one sub-command per module of this package.

Each command module declares ``NAME``, ``HELP``, ``EXAMPLES`` (the epilog of its ``--help``),
``add_arguments(parser)`` and ``run(args, console)``; ``build_parser`` registers them in ``COMMANDS``
order. Usage errors print one line (``error: ...``) and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, convert, demo, export, inspect, methods, sweep
from .console import EXIT_USAGE

__all__ = ["build_parser", "COMMANDS"]

COMMANDS = (convert, sweep, inspect, export, bench, demo, methods)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _version_text() -> str:
    from .. import __version__

    return f"convfactor {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``convfactor`` command (subcommands and their options).

    Each sub-command's ``args.handler`` is its module's ``run``.
    """
    parser = _Parser(prog="convfactor", description="Factorize the convolutions of a trained PyTorch CNN, "
                     "export it to ONNX and measure fidelity and latency in onnxruntime.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="run 'convfactor COMMAND --help' for the options and examples of each command")
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for module in COMMANDS:
        sub = commands.add_parser(module.NAME, help=module.HELP, description=module.HELP, epilog=module.EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser
