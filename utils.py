"""Small shared helpers: atomic writes, resumable partial directories, device choice, hashing,
provenance, progress bars on stderr."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UniretError, UsageError

logger = logging.getLogger("uniret")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename: readers see the old file or
    the new one, never half of it, and a failed write (a full disk, Ctrl-C) leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_readable(path: str | Path) -> None:
    """Give a file that a library wrote through a private temporary file (mode 0600, e.g.
    safetensors) the mode every other uniret file has: what ``open()`` creates under the umask
    (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_json(path: str | Path, what: str = "JSON file"):
    """A JSON file through the one guarded reader (:func:`uniret.files.read_json`): a regular file,
    size-capped, shallow; its failures are ValueErrors (and one-line UniretErrors)."""
    from .files import read_json as guarded

    return guarded(path, what)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a finished directory ``tmp`` to ``final``, replacing an older ``final`` if present.

    The old directory is renamed aside first (to a new hidden name beside it, so that nothing else
    is ever removed), so at every moment either the old or the new complete directory exists.
    Callers check with :func:`uniret.guards.prepare_output` that an older ``final`` is theirs.
    """
    tmp, final = Path(tmp), Path(final)
    aside = None
    if final.exists() or final.is_symlink():
        aside = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()


@contextlib.contextmanager
def scratch_dir(final: str | Path) -> Iterator[Path]:
    """A new hidden directory beside ``final`` to build it in; removed if the block fails (a full
    disk, Ctrl-C), kept (for :func:`publish_dir`) if it succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class PartialDir:
    """A resumable ``<out>.partial`` directory keyed by a fingerprint of what it is built from.

    Opening reuses the partial directory left by an interrupted run when its marker holds the same
    fingerprint (``resumed`` is True), and otherwise starts over (an old one is removed, and that is
    logged): work of one input is never mixed with work of another. ``init(path)`` fills a fresh
    directory before the marker is written, so a kill during initialisation also starts over.
    :meth:`publish` drops the marker and moves the directory to ``out`` in one rename
    (:func:`publish_dir`; an older ``out`` is replaced only at that moment).
    """

    MARKER = "uniret-partial.json"

    def __init__(self, out: str | Path, fingerprint: dict, init=None, restart: bool = False):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".partial")
        self.fingerprint = fingerprint
        marker = self.path / self.MARKER
        self.resumed = not restart and marker.is_file() and _read_marker(marker) == fingerprint
        if self.resumed:
            return
        if self.path.exists() or self.path.is_symlink():
            if not marker.is_file() or self.path.is_symlink():
                # Only a directory with our marker is ours to remove.
                raise UniretError(f"{self.path} exists and was not made by uniret; move it away or choose "
                                  "another output")
            logger.info("%s: %s; starting over", self.path, "restart asked" if restart else
                        "left by a run with other inputs or options")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        # The marker comes first (ours from now on), holding the fingerprint only once ``init`` is
        # done: a kill during initialisation starts over next time. A failure here (a full disk)
        # removes the directory just made: nothing is left that a re-run would take for a stranger's.
        try:
            atomic_write_json(marker, {"initialising": fingerprint})
            if init is not None:
                init(self.path)
            atomic_write_json(marker, fingerprint)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def discard(self) -> None:
        """Remove the partial directory (after a failure that makes resuming pointless: a full disk)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self) -> Path:
        """Move the finished directory into place as ``out``; returns ``out``."""
        (self.path / self.MARKER).unlink(missing_ok=True)
        publish_dir(self.path, self.out)
        return self.out


def _read_marker(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None  # a torn or foreign marker: not resumable


def resolve_device(device: str | None = "auto", local_rank: int | None = None, faiss: bool = False) -> str:
    """The one reading of ``--device auto | cpu | cuda | cuda:N``: ``"cpu"`` or ``"cuda:N"``.

    ``auto`` (or None) picks the GPU when one is visible, else the CPU; ``cuda`` without a number
    means this process's GPU, ``cuda:<local_rank>`` (torchrun's ``LOCAL_RANK`` when not given).
    ``faiss=True`` also counts the GPUs Faiss sees (search code whose GPU path is Faiss's). Anything
    else, or a GPU that is not there, is a one-line error. torch and faiss are imported only when a
    GPU is asked for or looked for.
    """
    name = "auto" if device is None else str(device).strip().lower()
    if name == "cpu":
        return "cpu"
    if name not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    visible = _visible_gpus(faiss)
    if name == "auto" and visible == 0:
        return "cpu"
    if visible == 0:
        raise UniretError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    index = int(name.partition(":")[2]) if ":" in name else local_rank
    if index >= visible:
        raise UniretError(f"--device {device}: only {visible} CUDA device(s) are visible (cuda:0..cuda:{visible - 1})")
    return f"cuda:{index}"


def _visible_gpus(with_faiss: bool) -> int:
    if sys.platform.startswith("linux") and not _nvidia_driver_present():
        return 0  # no NVIDIA driver, so no CUDA device: answer without importing torch (seconds)
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if with_faiss and n == 0:
        import faiss

        n = int(faiss.get_num_gpus())
    return n


def _nvidia_driver_present() -> bool:
    """Whether the Linux kernel exposes an NVIDIA driver (native, in a container, or WSL's /dev/dxg)."""
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"))


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


def announce_model_load(what) -> None:
    """One stderr line as soon as a command starts loading a model: importing torch and building the
    network take seconds of silence otherwise."""
    name = "(the default)" if what is None else str(what).replace("\r", "\\r").replace("\n", "\\n")
    logger.info("loading model %s (the first time takes ~10 s)", name)
