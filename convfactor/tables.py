"""The one text-table formatter: every fixed-width table convfactor prints goes through ``format_grid``.

    format_grid(["layer", "MACs"], [["conv1", "13.8k"], ["fc", "64"]], left=1)
    # layer   MACs
    # ------------
    # conv1  13.8k
    # fc        64

Columns are padded to their widest cell and separated by two spaces; the first ``left`` columns are
left-aligned, the rest right-aligned. A free-text last column (a note) is not padded. Plain strings in,
plain lines out: tables stay the same in a terminal, a log file and a test.

Why no table library: the tables are read in logs and CI output as often as in a terminal, and the
tests and the README compare their text; ``rich`` would draw box characters and colours that a plain
log does not need, for a 30-line helper.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_grid"]

_GAP = "  "


def format_grid(headers: Sequence[str] | None, rows: Sequence[Sequence[str]], *, left: int | None = None,
                free_last: bool = False) -> list[str]:
    """The lines of a fixed-width table: header, a rule of dashes, then one line per row.

    Args:
        headers: column titles; None: no header and no rule (a key-value block).
        rows: the cells, already formatted as strings; every row as long as ``headers``.
        left: how many leading columns are left-aligned (default: all); the others are right-aligned.
        free_last: the last column is free text: left-aligned, never padded, and the rule spans only
            its title.
    Returns:
        The lines, without trailing spaces.
    """
    count = len(headers) if headers is not None else max((len(r) for r in rows), default=0)
    left = count if left is None else left
    titles = list(headers) if headers is not None else [""] * count
    widths = [max([len(titles[i])] + [len(r[i]) for r in rows]) for i in range(count)]
    if free_last and count:
        widths[-1] = len(titles[-1])

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        if free_last and count:
            padded[-1] = cells[-1]
        return _GAP.join(padded).rstrip()

    body = [line(r) for r in rows]
    if headers is None:
        return body
    return [line(titles), "-" * (sum(widths) + len(_GAP) * (count - 1))] + body
