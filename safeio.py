"""Reading what users hand us without being hurt by it: record paths, arrays, LMDB files, vectors.

- :func:`contained_path` / :func:`read_contained`: a record path is read only when it is relative,
  has no ``..``, resolves (symlinks included) to a regular file under its root and is at most
  :data:`MAX_IMAGE_BYTES`; a FIFO or a device is refused from ``stat``, never opened for reading.
- :func:`load_npy`: ``.npy`` files never unpickle; a header is checked against the file's size
  before the data is read or mapped (a truncated file is a one-line error, not a crash).
- :func:`check_lmdb`: an LMDB data file shorter than its own header says is refused before it is
  memory-mapped (reading past its end would kill the process with SIGBUS).
- :func:`check_finite`: NaN or infinite vectors are refused where they enter an index or a metric.
- :func:`read_small` / :func:`read_json` / :func:`parse_json` (from :mod:`uniret.files`, re-exported
  here): the one reader of JSON and other small files.

Every refusal is a one-line :class:`~uniret.errors.UniretError` saying what to do.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import UniretError
from .files import (  # noqa: F401 - the one reader of small files, re-exported for its users
    MAX_JSON_DEPTH,
    MAX_SMALL_BYTES,
    BadFile,
    is_utf8_name,
    json_problem,
    parse_json,
    read_json,
    read_small,
)
from .guards import resolved

#: Largest image file read for packing, embedding or a query (a larger one is skipped and listed).
MAX_IMAGE_BYTES = 64 << 20


class UnsafePath(UniretError):
    """A record path that would read outside its root, or something that is not a regular file."""


class MissingImage(UnsafePath):
    """A record path with no file behind it."""


def contained_path(root: str | Path, rel: str) -> Path:
    """The real path of record ``rel`` under ``root``, or :class:`UnsafePath` saying why not."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UnsafePath(f"{rel!r}: not a usable relative path")
    parts = PurePosixPath(rel.replace("\\", "/"))
    if parts.is_absolute():
        raise UnsafePath(f"{rel}: absolute path; record paths must be relative to the image root")
    if ".." in parts.parts:
        raise UnsafePath(f"{rel}: '..' leads outside the image root")
    real_root = resolved(root)
    full = resolved(real_root / rel)
    if real_root not in full.parents:
        raise UnsafePath(f"{rel}: a symbolic link leads outside the image root {root}")
    return full


def _check_regular(st: os.stat_result, rel: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise UnsafePath(f"{rel}: {kind}, not an image file")
    if st.st_size > max_bytes:
        raise UnsafePath(f"{rel}: {st.st_size:,} bytes is over the {max_bytes >> 20} MB limit for an image")


def check_contained(root: str | Path, rel: str, max_bytes: int = MAX_IMAGE_BYTES) -> os.stat_result:
    """``stat`` of record ``rel`` after the checks of :func:`read_contained` (nothing is opened)."""
    full = contained_path(root, rel)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise MissingImage(f"{rel}: no such file under {root}") from None
    except OSError as exc:
        raise UnsafePath(f"{rel}: cannot read ({exc.strerror})") from None
    _check_regular(st, rel, max_bytes)
    return st


def read_contained(root: str | Path, rel: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of record ``rel`` under ``root``: a regular file inside the root, at most ``max_bytes``."""
    check_contained(root, rel, max_bytes)
    full = contained_path(root, rel)
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO since the check, opening does not hang;
        # O_NOFOLLOW: nor for a symbolic link; fstat below sees what was really opened.
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafePath(f"{rel}: cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        _check_regular(os.fstat(fd), rel, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafePath(f"{rel}: over the {max_bytes >> 20} MB limit for an image")
    return data


def _npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, offset of the data) from a ``.npy`` header; the data is not read."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
        except ValueError:
            raise UniretError(f"{path}: not a .npy file (a pickle or another format?); uniret reads only .npy "
                              "arrays of numbers") from None
        try:
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(f, max_header_size=100_000)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise UniretError(f"{path}: damaged .npy header ({str(exc).splitlines()[0][:120]})") from None
        return shape, dtype, f.tell()


def load_npy(path: str | Path, mmap: bool = False, kinds: str = "fiub", what: str = "array") -> np.ndarray:
    """A ``.npy`` of numbers (dtype kinds ``kinds``), never unpickled; memory-mapped with ``mmap``.

    Object arrays (pickles), other dtypes and files shorter than their header says are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UniretError(f"{path}: missing {what} file; the directory is incomplete, re-create it")
    shape, dtype, offset = _npy_header(path)
    if dtype.hasobject:
        raise UniretError(f"{path}: holds Python objects (a pickle); uniret never unpickles: re-create the file")
    if dtype.kind not in kinds:
        raise UniretError(f"{path}: holds {dtype} values, not numbers; re-create the {what}")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise UniretError(f"{path}: truncated ({size:,} of {need:,} bytes); re-create the {what}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UniretError(f"{path}: unreadable {what} ({str(exc).splitlines()[0][:160]})") from None


# LMDB's meta pages (lmdb.h / mdb.c, 64-bit): a 16-byte page header, then MDB_meta: magic, version,
# address, mapsize, two MDB_db records (the free DB's md_pad holds the page size), last page, txnid.
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<IIQQ48s48sQQ")
_PAGE_HEADER = 16


def _lmdb_meta(f, offset: int) -> tuple[int, int, int] | None:
    """(page size, last page, txnid) of the meta page at ``offset``; None when it is not one."""
    f.seek(offset + _PAGE_HEADER)
    raw = f.read(_META.size)
    if len(raw) < _META.size:
        return None
    magic, _, _, _, free_db, _, last_pg, txnid = _META.unpack(raw)
    if magic != _LMDB_MAGIC:
        return None
    return struct.unpack_from("<I", free_db)[0], last_pg, txnid


def check_lmdb(path: str | Path, what: str = "LMDB store") -> None:
    """Refuse an LMDB environment directory whose ``data.mdb`` is missing, not LMDB, or shorter than
    its newest meta page says, before anything maps it."""
    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as f:
            first = _lmdb_meta(f, 0)
            second = _lmdb_meta(f, first[0]) if first and first[0] >= 512 else None
    except FileNotFoundError:
        raise UniretError(f"{path}: no data.mdb; not a {what}") from None
    metas = [m for m in (first, second) if m is not None]
    if not metas:
        raise UniretError(f"{data}: not an LMDB file (damaged?); re-create the {what}")
    psize, last_pg, _ = max(metas, key=lambda m: m[2])
    need = (last_pg + 1) * psize
    if psize < 512 or psize & (psize - 1) or size < need:
        raise UniretError(f"{data}: truncated or damaged ({size:,} bytes, its header needs {need:,}); "
                          f"re-create the {what}")


def settle_lmdb(path: str | Path) -> None:
    """Extend a just-written ``data.mdb`` with zeros up to the last page its header names. LMDB counts
    pages it allocated and freed within one transaction without ever writing them, so a sound file
    may end before that page, and :func:`check_lmdb` would take it for a truncated one. The added
    pages are free: LMDB never reads them as data. Every writer calls this after its last commit."""
    data = Path(path) / "data.mdb"
    with open(data, "rb") as f:
        first = _lmdb_meta(f, 0)
        second = _lmdb_meta(f, first[0]) if first and first[0] >= 512 else None
    metas = [m for m in (first, second) if m is not None]
    if metas:
        psize, last_pg, _ = max(metas, key=lambda m: m[2])
        if data.stat().st_size < (last_pg + 1) * psize:
            os.truncate(data, (last_pg + 1) * psize)


def check_finite(vectors: np.ndarray, what: str, ids: np.ndarray | None = None, chunk: int = 1 << 16) -> None:
    """Refuse rows with NaN or infinite values, naming how many and which (ids, or row numbers)."""
    bad = []
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start:start + chunk])
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1)) + start
        bad.extend(rows.tolist())
    if bad:
        names = np.asarray(ids)[bad] if ids is not None else bad
        shown = ", ".join(str(int(i)) for i in names[:5]) + (", ..." if len(bad) > 5 else "")
        raise UniretError(f"{what}: {len(bad)} vector(s) with NaN or infinite values (ids {shown}); "
                          "the model that made them is broken: re-train or re-embed")
