"""Printing results: a plain-text table or JSON on stdout (``--format table|json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from enum import Enum


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, (list, tuple)):
        return ",".join(format_cell(v) for v in value)
    return str(value)


def render_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> str:
    """Columns aligned with spaces; numbers right-aligned."""
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c) is not None) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(columns)))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def emit(rows: Sequence[dict], columns: Sequence[str], fmt: OutputFormat | str = "table", title: str | None = None,
         extra: dict | None = None) -> None:
    """Print rows as a table, or as JSON (``{"rows": [...], **extra}``)."""
    if str(getattr(fmt, "value", fmt)) == "json":
        payload = {"rows": list(rows)}
        if extra:
            payload.update(extra)
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(render_table(rows, columns, title) + "\n")
