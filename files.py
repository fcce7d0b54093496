"""The one reader of JSON and other small files uniret reads whole (configs, ``--config``, manifests,
split files, ``--ids``, metrics.json, webdataset side files, LMDB values).

- :func:`read_small`: a regular file only (a FIFO, a device or a directory is refused from ``fstat``
  after a non-blocking open: nothing hangs, ``/dev/zero`` is never read), at most a size cap;
- :func:`parse_json`: JSON nested at most :data:`MAX_JSON_DEPTH` deep and free of lone surrogate
  escapes (no RecursionError here or in any code that walks the value);
- :func:`read_json`: both.

Every failure is a one-line :class:`BadFile` naming the file (also a ValueError, so callers that
wrap a damaged file in their own line keep doing so). Imports nothing of uniret but its errors, so
that every module (``guards`` included) can use it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import UniretError

#: Largest JSON or other small file read whole (configs, manifests, splits, id lists, reports).
MAX_SMALL_BYTES = 256 << 20

#: Deepest nesting of lists and objects in any JSON uniret reads (its own files nest at most ~6 deep).
MAX_JSON_DEPTH = 64


class BadFile(UniretError, ValueError):
    """A small file that is not what it should be: not a regular file, too large, not (shallow) JSON.

    Also a ValueError, so that callers that wrap a damaged file's ValueError in their own line
    (naming what the file is for) keep doing so."""


def is_utf8_name(name: str) -> bool:
    """Whether a name (a file name, a record path) is UTF-8 text: a file name that is not decodes to
    lone surrogates (Python's surrogate escapes), which no JSON, LMDB key or Parquet column holds."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_small(path: str | Path, what: str = "file", max_bytes: int = MAX_SMALL_BYTES) -> bytes:
    """The bytes of a small file read whole: a regular file (symbolic links followed) of at most
    ``max_bytes``. A FIFO, a device or a directory is refused from ``fstat`` after a non-blocking open,
    so nothing hangs on a FIFO or reads ``/dev/zero`` until memory runs out. A missing or unreadable
    file raises the OSError (callers that expect one say what it means)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "a socket")
            raise BadFile(f"{path}: {kind}, not a regular file; give the {what} as a file")
        if st.st_size > max_bytes:
            raise BadFile(f"{path}: {st.st_size:,} bytes is over the {max_bytes >> 20} MB limit for a {what}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadFile(f"{path}: over the {max_bytes >> 20} MB limit for a {what}")
    return data


def json_problem(obj, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why a parsed JSON value is not usable, or None: lists and objects nested deeper than ``limit``,
    or text holding lone surrogate escapes (``"\\ud800"``: valid JSON, but no text that UTF-8 can
    encode, so no path, LMDB key or Parquet column can hold it). Checked without recursion."""
    surrogate = "text with a lone surrogate escape (\\udXXX), which is not UTF-8 text"
    if isinstance(obj, str):
        return None if is_utf8_name(obj) else surrogate
    stack = [(obj, 1)] if isinstance(obj, (list, dict)) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return f"JSON nested deeper than {limit} levels"
        if isinstance(value, dict):
            if not all(is_utf8_name(k) for k in value):
                return surrogate
            value = value.values()
        for v in value:
            kind = type(v)
            if kind is str:
                if not is_utf8_name(v):
                    return surrogate
            elif kind is list or kind is dict:
                stack.append((v, depth + 1))
    return None


def parse_json(data: bytes | str, source: str | Path, what: str = "JSON file"):
    """``json.loads`` that fails as one line naming ``source``: invalid JSON, text that is not UTF-8,
    and lists or objects nested deeper than :data:`MAX_JSON_DEPTH` (which would otherwise be a
    RecursionError here or in any code that walks the value)."""
    try:
        obj = json.loads(data)
    except RecursionError:
        obj = _TOO_DEEP
    except json.JSONDecodeError as exc:
        raise BadFile(f"{source}: not valid JSON (line {exc.lineno}: {exc.msg}); fix or re-create the {what}") from None
    except UnicodeDecodeError:
        raise BadFile(f"{source}: not UTF-8 text; fix or re-create the {what}") from None
    problem = f"JSON nested deeper than {MAX_JSON_DEPTH} levels" if obj is _TOO_DEEP else json_problem(obj)
    if problem:
        raise BadFile(f"{source}: {problem}; fix or re-create the {what}")
    return obj


_TOO_DEEP = object()


def read_json(path: str | Path, what: str = "JSON file", max_bytes: int = MAX_SMALL_BYTES):
    """A JSON file read through :func:`read_small` and :func:`parse_json`."""
    return parse_json(read_small(path, what, max_bytes), path, what)
