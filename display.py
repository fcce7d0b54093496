r"""Printing results: a plain-text table or JSON on stdout (``--format table|json``).

Everything printed is terminal-safe (:func:`printable`): control characters (``ESC``, ``BEL``,
newlines, C1 codes, bidirectional overrides) in paths, names and metadata are shown escaped, so a
record path can neither retitle or clear the terminal nor forge a result row; file names that are
not UTF-8 (Python's surrogate escapes) are shown as ``\xNN``, so no invalid UTF-8 reaches stdout.
JSON output is escaped by the encoder (``ensure_ascii``).

One convention for numbers a user compares: retrieval metrics are fractions (0-1, as in UnED and
the README), shown with :data:`DECIMALS` decimals in the terminal and in report.md/html alike
(:func:`format_metric`); similarity scores are clipped to [-1, 1] (:func:`display_score`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Collection, Sequence
from enum import Enum


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


DECIMALS = 4


# C0 and C1 control characters, DEL, line/paragraph separators, bidirectional overrides and
# isolates, and lone surrogates (undecodable bytes of a file name, or escapes in JSON).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the raw byte of a file name that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text) -> str:
    """``text`` safe to write to a terminal: control characters and undecodable bytes escaped."""
    return _UNSAFE.sub(_escape, str(text))


def format_metric(value: float | None) -> str:
    """A metric (a fraction) or a score as it is shown everywhere: ``0.6140``; ``-`` for None."""
    return "-" if value is None else f"{value:.{DECIMALS}f}"


def display_score(value: float) -> float:
    """A cosine similarity for display: clipped to [-1, 1] (fp16 vectors can score 1.0001)."""
    return round(min(1.0, max(-1.0, float(value))), 6)


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, (list, tuple)):
        return ",".join(format_cell(v) for v in value)
    return printable(value)


def render_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None,
                 metrics: Collection[str] = ()) -> str:
    """Columns aligned with spaces; numbers right-aligned; ``metrics`` columns by :func:`format_metric`."""
    cells = [[format_metric(r.get(c)) if c in metrics and isinstance(r.get(c), float) else format_cell(r.get(c))
              for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c) is not None) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = []
    if title:
        body = title.lstrip("\n")  # a blank line before the title is the caller's; anything inside is escaped
        out.append(title[:len(title) - len(body)] + printable(body))
    out.append(line([printable(c) for c in columns]))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def emit(rows: Sequence[dict], columns: Sequence[str], fmt: OutputFormat | str = "table", title: str | None = None,
         extra: dict | None = None, metrics: Collection[str] = ()) -> None:
    """Print rows as a table (``metrics``: columns of metrics or scores, see :func:`format_metric`),
    or as JSON (``{"rows": [...], **extra}``)."""
    if str(getattr(fmt, "value", fmt)) == "json":
        payload = {"rows": list(rows)}
        if extra:
            payload.update(extra)
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(render_table(rows, columns, title, metrics) + "\n")
