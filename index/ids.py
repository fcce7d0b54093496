"""Stored ids as user input: strict parsing of ``id:N`` queries, ``--ids`` files and API id lists.

An id is a non-negative integer below 2**63 and nothing else: ``2.7``, ``1e3``, ``true`` or
``"0x10"`` are refused rather than silently turned into another id (``int(2.7) == 2``,
``int(True) == 1``). ``--ids`` files may be one id per line, a JSON list, the JSON object that
``uniret dedup --out`` writes (its ``remove`` list is used) or a ``.npy`` of an integer dtype.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import UniretError

MAX_ID = 2**63 - 1
_INT_TEXT = re.compile(r"[+]?[0-9]+")


class UnknownIdError(UniretError):
    """An id that is well formed but not in the index (HTTP 404)."""

    http_status = 404


def parse_id(value, what: str = "id") -> int:
    """One id from text or a JSON value; raises a one-line :class:`UniretError` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise UniretError(f"{what} {value!r}: expected a non-negative integer id, not a boolean")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise UniretError(f"{what} {value!r}: expected a non-negative integer id")
    if not 0 <= number <= MAX_ID:
        raise UniretError(f"{what} {value!r}: ids are integers in 0..{MAX_ID}")
    return number


def parse_ids(values, what: str = "id") -> np.ndarray:
    """A list of ids (JSON values or text) as an int64 array, each checked by :func:`parse_id`."""
    if not isinstance(values, (list, tuple)):
        raise UniretError(f"{what}s: expected a list of integer ids, got {type(values).__name__}")
    return np.asarray([parse_id(v, what) for v in values], dtype=np.int64)


def read_id_file(path) -> np.ndarray:
    """Unique sorted ids from a ``.npy``, a JSON list or ``uniret dedup --out`` JSON, or a text file
    (one id per line; ``#`` starts a comment)."""
    return read_id_source(path)[0]


def read_id_source(path) -> tuple[np.ndarray, dict | None]:
    """(unique sorted ids, provenance) of an ``--ids`` file. Provenance is the ``index`` object of a
    ``uniret dedup --out`` result (``{"id", "version", "path"}``: which index and version it was
    computed on), None for id lists the user wrote. A JSON object that does not say where its ids
    came from is refused: ids of one index mean other items in another."""
    from ..safeio import load_npy, read_json, read_small

    p = Path(path)
    if not p.is_file():
        raise UniretError(f"--ids {p}: no such file")
    what = f"--ids {p}:"
    provenance = None
    if p.suffix == ".npy":
        arr = load_npy(p, what="id list")
        if arr.dtype.kind not in "iu":
            raise UniretError(f"{what} a .npy of ids must have an integer dtype, not {arr.dtype}")
        values = arr.ravel().tolist()
    elif p.suffix == ".json":
        values = read_json(p, "id list")
        if isinstance(values, dict):
            if not isinstance(values.get("remove"), list):
                raise UniretError(f"{what} a JSON object needs a \"remove\" list (as `uniret dedup --out` writes)")
            provenance = values.get("index")
            if not str(values.get("format", "")).startswith("uniret-dedup") or not _is_provenance(provenance):
                raise UniretError(f"{what} a JSON object that does not say which index its ids belong to (not "
                                  "written by this version of `uniret dedup --out`); re-run `uniret dedup INDEX "
                                  "--out`, or give the ids as a plain JSON list")
            values = values["remove"]
    else:
        try:
            lines = read_small(p, "id list").decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise UniretError(f"{what} not a text file of ids (one per line)") from None
        values = [v for v in (line.split("#")[0].strip() for line in lines) if v]
    return np.unique(parse_ids(values, what=what[:-1] + " id")), provenance


def _is_provenance(value) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), str) for k in ("id", "version", "path"))
