"""Guards for what a command writes: outputs never destroy what uniret did not make.

Every writing command (``data demo|pack``, ``model init``, ``embed``, ``index build``, ``eval``,
``train``, ...) calls :func:`prepare_output` before it does any work, and holds
:func:`output_lock` while it writes:

- an output may be a new path, an empty directory, or a previous output *of the same kind*, which
  the command recognises by its marker (a manifest, a config, a format key) and replaces only when
  the user passes ``--overwrite``; any other non-empty directory, or a file, is refused;
- an output may not be, or lie inside, one of the command's inputs, nor contain one;
- an output may not lie inside another uniret output (an index, a store, a model, a run, a report,
  a packed store), even with ``--overwrite``: ``model init --out INDEX/model`` would replace the
  index's model copy, ``search --html REPORT/report.html`` an evaluation's page
  (:func:`enclosing_output`);
- an output under a file, on a read-only file system or in a directory without write permission is
  refused before any work is done (one line, not a traceback halfway);
- two commands writing the same output at once: the second gets a one-line error (a lock).

What a command reads is guarded in :mod:`uniret.safeio`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import UniretError, UsageError
from .files import read_json


def resolved(path: str | Path) -> Path:
    """The absolute path with symlinks of its existing part resolved (the path need not exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def check_apart(out: str | Path, inputs: Iterable[str | Path | None], option: str = "--out") -> None:
    """Refuse an output that is, or lies inside, an input, and an input that lies inside the output."""
    target = resolved(out)
    for given in inputs:
        if given is None:
            continue
        source = resolved(given)
        if target == source or source in target.parents:
            raise UniretError(f"{option} {out} is inside the input {given}; writing there could destroy it: "
                              "choose an output outside the input")
        if target in source.parents:
            raise UniretError(f"{option} {out} contains the input {given}; replacing it would destroy the input: "
                              "choose another output")


#: How uniret's outputs are recognised: (what, marker file, format prefix or None for any such file).
#: A demo folder is absent on purpose: it holds the outputs of every stage by design.
OUTPUT_MARKERS = (
    ("index", "CURRENT", None),
    ("embedding store", "manifest.json", "uniret-embeddings"),
    ("model directory", "config.json", "uniret-model"),
    ("evaluation report", "metrics.json", "uniret-eval-report"),
    ("training run", "train_config.json", None),
    ("packed store", "data.mdb", None),
    ("demo collection", "summary.json", "uniret-demo-collection"),
)


def output_kind(path: str | Path) -> str | None:
    """What uniret output the directory ``path`` is (by its marker file), or None."""
    path = Path(path)
    for what, marker, prefix in OUTPUT_MARKERS:
        file = path / marker
        if not file.is_file():
            continue
        if marker == "CURRENT":  # an index names its live version (other tools use this name too)
            try:
                with open(file, "rb") as f:
                    if f.read(8)[:1] == b"v":
                        return what
            except OSError:
                pass
        elif prefix is None or file_has_format(file, prefix):
            return what
    return None


def enclosing_output(out: str | Path) -> tuple[Path, str] | None:
    """The uniret output that ``out`` would be written inside (its nearest such ancestor), or None."""
    for parent in resolved(out).parents:
        kind = output_kind(parent)
        if kind is not None:
            return parent, kind
    return None


def check_writable(out: str | Path, option: str = "--out") -> None:
    """Refuse an output inside another uniret output (:func:`enclosing_output`), and one whose
    nearest existing ancestor is a file, or is not writable (read-only file system, no permission),
    before any work is done."""
    out = Path(out)
    inside = enclosing_output(out)
    if inside is not None:
        raise UniretError(f"{option} {out} is inside the {inside[1]} {inside[0]}; uniret never writes into another "
                          "of its outputs (not even with --overwrite): choose a path outside it")
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UniretError(f"{option} {out}: {parent} is a file, not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        try:
            read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise UniretError(f"{option} {out}: {parent} {why}; choose an output path where you can write")


def has_format(path: str | Path, marker: str, prefix: str) -> bool:
    """Whether ``path/marker`` is a small JSON object whose ``format`` starts with ``prefix``: how an
    output of uniret's is recognised (a store's manifest, a model's config, a report's metrics)."""
    return file_has_format(Path(path) / marker, prefix)


def file_has_format(file: str | Path, prefix: str) -> bool:
    """Whether ``file`` is a small JSON object whose ``format`` starts with ``prefix``."""
    file = Path(file)
    try:
        if not file.is_file() or file.stat().st_size > 1 << 26:
            return False
        obj = read_json(file)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith(prefix)


def prepare_output(out: str | Path, what: str, is_own: Callable[[Path], bool], inputs: Iterable = (),
                   overwrite: bool = False, option: str = "--out", flag: str = "--overwrite") -> bool:
    """Check that writing the directory ``out`` destroys nothing uniret did not make.

    ``what`` names the kind of output ("embedding store"); ``is_own(path)`` recognises a previous
    output of that kind by its marker. Returns True when ``out`` holds such an output, which the
    caller may then replace (only reached with ``overwrite``); False for a new path or an empty
    directory. Raises a one-line error otherwise.
    """
    out = Path(out)
    check_apart(out, inputs, option)
    check_writable(out, option)
    if out.is_symlink() and not out.exists():
        raise UniretError(f"{option} {out} is a dangling symbolic link; remove it or choose another path")
    if not out.exists():
        return False
    if not out.is_dir():
        raise UniretError(f"{option} {out} is a file, not {_a(what)}; uniret will not replace it: choose another path")
    if is_own(out):
        if not overwrite:
            raise UniretError(f"{option} {out} already holds {_a(what)}; pass {flag} to replace it, "
                              "or choose another path")
        return True
    if any(out.iterdir()):
        raise UniretError(f"{option} {out} is a non-empty directory that is not {_a(what)}; uniret never replaces "
                          "what it did not make: choose a new or empty directory")
    return False


@contextlib.contextmanager
def claim_output(out: str | Path, what: str, is_own: Callable[[Path], bool], inputs: Iterable = (),
                 overwrite: bool = False, option: str = "--out", flag: str = "--overwrite") -> Iterator[bool]:
    """The one guard of a writing command: :func:`prepare_output`, then :func:`output_lock` held for
    the block (and the checks again under the lock: another command may have written meanwhile).
    Yields whether ``out`` holds a previous output of this kind (to be replaced)."""
    inputs = list(inputs)
    prepare_output(out, what, is_own, inputs, overwrite, option, flag)  # refuse before creating anything
    with output_lock(out, what):
        yield prepare_output(out, what, is_own, inputs, overwrite, option, flag)


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def check_output_file(out: str | Path, what: str, is_own: Callable[[Path], bool], inputs: Iterable = (),
                      overwrite: bool = False, option: str = "--out", suffixes: tuple[str, ...] = ()) -> None:
    """The guard of a single output file (a page, a JSON list), before any work: one of ``suffixes``,
    not inside an input, its folder writable; an existing file only when it is ``what`` (``is_own``)
    and ``overwrite`` is given."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {out}: give a file name ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise UsageError(f"{option} {out} is a directory; give a file name")
    check_apart(out, inputs, option)
    check_writable(out, option)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_file() or not is_own(out):
            raise UniretError(f"{option} {out} exists and is not {_a(what)} uniret wrote; uniret never replaces "
                              "what it did not make: choose a new file name")
        if not overwrite:
            raise UniretError(f"{option} {out} already holds {_a(what)}; pass --overwrite to replace it, "
                              "or choose a new file name")


#: OSError numbers that mean the disk (or a size limit) is full.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(exc: BaseException) -> bool:
    """A full disk, whichever library reported it (OSError, or LMDB/Faiss errors quoting it)."""
    if isinstance(exc, OSError) and exc.errno in FULL_DISK:
        return True
    return any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded", "File too large"))


@contextlib.contextmanager
def output_lock(out: str | Path, what: str = "output") -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (a hidden ``.<name>.lock`` file beside it) while writing.

    A second command writing the same output at the same time gets a one-line error instead of
    mixing its work into the first one's. The lock file is removed when the holder is done.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UniretError(f"{out}: another uniret command is writing this {what} now; wait for it to "
                                  "finish, or choose another output") from None
            raise
        # The holder before us may have removed the file after we opened it: lock the current one.
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def in_range(value, option: str, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """``value`` when it lies in the range (bounds None are open-ended), else a one-line UsageError."""
    bad = value != value  # NaN
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        left = "-inf" if low is None else f"{low}"
        right = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise UsageError(f"{option} must be in {interval}, not {value}")
    return value
