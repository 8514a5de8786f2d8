"""``main``: parse the command line, run the command, turn its errors into one line and an exit code."""

from __future__ import annotations

from collections.abc import Sequence

from .console import EXIT_INTERRUPTED, EXIT_USAGE, Console
from .parser import build_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 fidelity check failed, 2 user error, 3 nothing replaced).

    Example:
        >>> main(["methods"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    from ..errors import ConvfactorError

    console = Console(args.quiet)
    try:
        with console.warnings_filtered():
            return args.handler(args, console)
    except ConvfactorError as error:
        console.error(str(error))
        return getattr(error, "exit_code", EXIT_USAGE)  # NothingReplacedError: 3
    except OSError as error:  # the disk, not the code: full, read-only, removed under our feet
        where = f" ({error.filename})" if error.filename else ""
        console.error(f"{error.strerror or error}{where}; nothing was written")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
