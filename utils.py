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


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, disable: bool = False) -> Iterator:
    """A rich progress bar on stderr; yields ``advance(n)``. Quiet when stderr is not a terminal."""
    if disable or not sys.stderr.isatty():
        yield lambda n=1, **kw: None
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
