"""Plain-text and markdown tables for summaries printed at the end of a command."""
from __future__ import annotations


def _cell(value) -> str:
    if value is None:  # a metric over nothing (no scored completion)
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]  # no rows: the headers
    line = (lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |") if markdown \
        else (lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    rule = ("|" + "|".join("-" * (w + 2) for w in widths) + "|") if markdown \
        else "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *map(line, cells)])
