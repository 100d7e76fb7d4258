"""Tables for the client commands: rich on a terminal, aligned plain text for pipes and files."""

from __future__ import annotations

import sys
from typing import Any


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value == value else "nan"
    return "-" if value is None else str(value)


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """A rich table on a terminal; aligned plain text (numbers right-aligned) for pipes and files."""
    cells = [[fmt(v) for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for header, is_num in zip(headers, numeric, strict=True):
            table.add_column(header, justify="right" if is_num else "left")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    print(line(headers))
    for row in cells:
        print(line(row))
    if not cells:
        print(f"(no {title})")
