"""``convfactor methods``: the registered factorization methods, their math and what their rank means."""

from __future__ import annotations

import argparse

from .console import EXIT_OK, Console
from .options import add_output_arguments

__all__ = ["NAME", "HELP", "EXAMPLES", "add_arguments", "run"]

NAME = "methods"
HELP = "list the factorization methods, their math and what their rank means"
EXAMPLES = """\
examples:
  convfactor methods
  convfactor methods --json
"""


def add_arguments(methods: argparse.ArgumentParser) -> None:
    """The options of ``methods``."""
    add_output_arguments(methods, force=False)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``methods``; returns the exit code."""
    from ..methods import available_methods, get_method
    from ..tables import format_grid

    rows = [{"name": name, "summary": get_method(name).summary, "rank_meaning": get_method(name).rank_meaning}
            for name in available_methods()]
    if args.json:
        console.document({"command": "methods", "methods": rows})
        return EXIT_OK
    cells = [cell for row in rows for cell in ([row["name"], row["summary"]], ["", f"rank: {row['rank_meaning']}"])]
    lines = format_grid(None, cells, free_last=True)
    lines.append("")
    lines.append("a policy's rank: an int (above), a list of ints (one per component), a fraction in (0, 1] of "
                 "the full rank, or energy=E (keep that share of the squared singular values)")
    console.result("\n".join(lines))
    return EXIT_OK
