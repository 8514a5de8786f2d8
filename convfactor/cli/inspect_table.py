"""The text form of ``convfactor inspect``: a table that fits 100 columns, or every column with ``--wide``.

It formats what ``convfactor.inspect_model`` returns; the analysis itself lives in the library.

The default table keeps what decides a policy: each layer's shape (kernel, ``/stride``, ``gGROUPS``),
params, MACs and share, and for each method with a spectrum the energy kept at half its full rank.
``--wide`` adds the type, stride and groups columns and the energy at 25/50/75% for every method.
"""

from __future__ import annotations

import textwrap
from typing import Any

from ..report import human_count
from ..tables import format_grid

__all__ = ["format_inspect_table", "WIDTH"]

WIDTH = 100
_SHORT = {"spatial_svd": "spsvd", "tucker2": "tuck2", "depthwise": "dwise", "grouped": "group"}
# Which columns stay longest when the table must fit: the methods ``auto`` chooses among first, the opt-in
# and challenge-score forms last (an unknown method after them).
_KEEP = ("spatial_svd", "tucker2", "svd", "depthwise", "grouped", "cp", "channel_svd", "shift", "dictionary", "sal")


def _drop_order(method: str) -> int:
    return _KEEP.index(method) if method in _KEEP else len(_KEEP)


def format_inspect_table(table: dict[str, Any], *, wide: bool = False, width: int = WIDTH) -> str:
    """The fixed-width text form of ``convfactor.inspect_model``'s result.

    Args:
        table: what ``convfactor.inspect_model`` returns.
        wide: every column (about 190 characters for six methods); else a table of at most ``width``
            columns where the layer names allow it (names are never cut).
        width: the line length of the default table and of its wrapped notes.
    """
    if wide:
        return _wide(table)
    return _compact(table, width)


def _energy_cell(value: Any, index: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "n/a"
    if index is None:
        return "/".join(f"{e:.2f}" for e in value)
    return f"{value[index]:.2f}"


def _shape(row: dict[str, Any]) -> str:
    text = f"{row['in']}->{row['out']}"
    if row["kernel"]:
        text += " " + "x".join(map(str, row["kernel"]))
    stride = row["stride"] or []
    if any(s != 1 for s in stride):
        text += " /" + (str(stride[0]) if len(set(stride)) == 1 else ",".join(map(str, stride)))
    if row["groups"] > 1:
        text += f" g{row['groups']}"
    return text


def _compact(table: dict[str, Any], width: int) -> str:
    fractions = table["fractions"]
    middle = min(range(len(fractions)), key=lambda i: abs(fractions[i] - 0.5))
    shown = [m for m in table["methods"] if any(isinstance(r["energy"][m], list) for r in table["layers"])]
    hidden = [m for m in table["methods"] if m not in shown]
    base = ["layer", "shape", "params", "MACs", "MACs %"]
    lines = format_grid(base + shown, _compact_rows(table, shown, middle), left=2)
    abbreviated, cut = False, []
    if max(map(len, lines)) > width:
        abbreviated = True
        while True:  # abbreviated names; then the least used methods dropped until it fits (--wide has them)
            lines = format_grid(base + [_SHORT.get(m, m[:5]) for m in shown], _compact_rows(table, shown, middle),
                                left=2)
            if max(map(len, lines)) <= width or not shown:
                break
            dropped = max(shown, key=_drop_order)
            shown.remove(dropped)
            cut.insert(0, dropped)
    notes = [f"energy: fraction of squared singular values kept at {round(100 * fractions[middle])}% of each "
             f"method's full rank; '-' no spectrum, 'n/a' the method cannot represent the layer"]
    if abbreviated:
        notes.append("columns: " + ", ".join(f"{_SHORT.get(m, m[:5])} = {m}" for m in shown
                                             if _SHORT.get(m, m[:5]) != m))
    if hidden:
        notes.append(f"not shown: {', '.join(hidden)} (no singular-value spectrum for any layer)")
    if cut:
        notes.append(f"not shown for width: {', '.join(cut)} (--wide shows every method)")
    notes.append("--wide: type, stride and groups columns, energy at "
                 f"{'/'.join(str(round(100 * f)) for f in fractions)}% for every method")
    return "\n".join(lines + _footer(table, None, notes, width))


def _compact_rows(table: dict[str, Any], shown: list[str], middle: int) -> list[list[str]]:
    rows = []
    for row in table["layers"]:
        share = "n/a" if row["macs_share"] is None else f"{100 * row['macs_share']:.1f}"
        rows.append([row["name"], _shape(row), human_count(row["params"]), human_count(row["macs"]), share]
                    + [_energy_cell(row["energy"][m], middle) for m in shown])
    return rows


def _footer(table: dict[str, Any], fractions: str | None, notes: list[str] | None,
            width: int | None = None) -> list[str]:
    totals = table["totals"]
    lines = ["", f"{totals['layers']} Conv/Linear layers; params {human_count(totals['params'])}; "
                 f"Conv/Linear MACs per sample {human_count(totals['layer_macs'])} "
                 f"at input {','.join(map(str, table['input_shape']))}"]
    if notes is None:
        lines.append(f"energy: fraction of squared singular values kept at {fractions}% of the full rank; "
                     f"'-' no spectrum, 'n/a' the method cannot represent the layer")
    else:
        lines += notes
    score = table.get("challenge_score")
    if score:
        lines.append(f"challenge score {score['score']:.4f} (params term {score['params_term']:.4f} + MACs term "
                     f"{score['macs_term']:.4f}; {score['weight_bits']}-bit weights, {score['activation_bits']}-bit "
                     f"activations, pruning {score['structured_pruning']:g}/{score['unstructured_pruning']:g})")
    if width is None:
        return lines
    return [wrapped for line in lines for wrapped in (textwrap.wrap(line, width, subsequent_indent="  ") or [""])]


def _wide(table: dict[str, Any]) -> str:
    """Every column: type, shape, stride, groups, and each method's energy at every fraction."""
    fractions = "/".join(f"{round(f * 100)}" for f in table["fractions"])
    headers = ["layer", "type", "shape", "stride", "groups", "params", "MACs", "MACs %"]
    headers += [f"{m} {fractions}%" for m in table["methods"]]
    rows = []
    for row in table["layers"]:
        shape = f"{row['in']}->{row['out']}" + (" " + "x".join(map(str, row["kernel"])) if row["kernel"] else "")
        stride = "-" if not row["stride"] else (
            str(row["stride"][0]) if len(set(row["stride"])) == 1 else ",".join(map(str, row["stride"])))
        share = "n/a" if row["macs_share"] is None else f"{100 * row['macs_share']:.1f}"
        rows.append([row["name"], row["type"], shape, stride, str(row["groups"]), human_count(row["params"]),
                     human_count(row["macs"]), share] + [_energy_cell(row["energy"][m]) for m in table["methods"]])
    return "\n".join(format_grid(headers, rows, left=3) + _footer(table, fractions, None))
