"""Small shared helpers: atomic writes, hashing, provenance, progress bars on stderr."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("uniret")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename: readers see the old file or
    the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a finished directory ``tmp`` to ``final``, replacing an older ``final`` if present.

    The old directory is renamed aside first, so at every moment either the old or the new
    complete directory exists under a known name (``final`` or ``final.old``).
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def stable_hash(obj) -> str:
    """A short hash of a JSON-able object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit() -> str | None:
    """The commit of the uniret source tree, when it runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


class _LineProgress:
    """Progress as plain lines on stderr, for logs and pipes where a bar cannot redraw: a line every
    ``every_s`` seconds, or at each further 5% of the total (at most one a second), and a last line
    with the total time. The rate is measured from the first ``advance`` on, so a resumed job's
    starting offset (``advance(done_before)``) does not inflate it."""

    every_s = 10.0
    steps = 20  # a line at each further 1/20 (5%) of the total

    def __init__(self, description: str, total: int | None):
        self.description, self.total, self.info = description, total, ""
        self.done = self.last_done = 0
        self.start = self.last_t = time.monotonic()
        self.rate_from: tuple[float, int] | None = None

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        self.info = self.info if info is None else info
        now = time.monotonic()
        if self.rate_from is None:
            self.rate_from, self.last_done = (now, self.done), self.done
            return
        crossed = bool(self.total) and self.done * self.steps // self.total > self.last_done * self.steps // self.total
        if now - self.last_t >= self.every_s or (crossed and now - self.last_t >= 1.0):
            self._line(now)

    def _rate(self, now: float) -> float | None:
        if self.rate_from is None or now - self.rate_from[0] <= 0 or self.done == self.rate_from[1]:
            return None
        return (self.done - self.rate_from[1]) / (now - self.rate_from[0])

    def _line(self, now: float) -> None:
        rate = self._rate(now)
        parts = [f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else f"{self.done}"]
        if rate:
            parts.append(f"{rate:.1f}/s")
            if self.total and self.done < self.total:
                parts.append(f"about {(self.total - self.done) / rate:.0f} s left")
        self._write(", ".join(parts))
        self.last_t, self.last_done = now, self.done

    def finish(self) -> None:
        if self.done:
            rate = self._rate(time.monotonic())
            self._write(f"{self.done} done in {time.monotonic() - self.start:.1f} s" + (f", {rate:.1f}/s" if rate else ""))

    def _write(self, text: str) -> None:
        sys.stderr.write(f"{self.description}: {text}{f' ({self.info})' if self.info else ''}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, disable: bool = False) -> Iterator:
    """Progress on stderr; yields ``advance(n, info=None)``. A rich bar when stderr is a terminal,
    otherwise periodic plain lines (:class:`_LineProgress`), so a batch job's log shows progress."""
    if disable:
        yield lambda n=1, **kw: None
        return
    if not sys.stderr.isatty():
        lines = _LineProgress(description, total)
        yield lines.advance
        lines.finish()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr_console(),
        transient=False,
    ) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            if info is not None:
                prog.update(task, advance=n, info=info)
            else:
                prog.advance(task, n)

        yield advance
