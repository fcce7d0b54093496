"""User-facing errors, and the one line each expected failure reads as.

A :class:`UniretError` carries one line that says what is wrong and what to do. The CLI prints it
without a traceback and exits with ``exit_code``; ``UNIRET_DEBUG=1`` shows the traceback.

Failures are best caught where they happen, with a message that knows the context. :func:`describe`
is the safety net behind that: it turns the failure classes a command can meet on bad input or a bad
machine state (an OSError by errno, a damaged LMDB, JSON or safetensors file, a Faiss error, an
undecodable image, running out of memory) into one line; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import json
import shutil


class UniretError(Exception):
    """An expected failure caused by input (paths, files, options); the message is shown as is.
    ``exit_code`` is what the CLI exits with, ``http_status`` what the server answers."""

    exit_code = 1
    http_status = 400


class UsageError(UniretError):
    """Options that do not fit together or have bad values."""

    exit_code = 2


class ImageDecodeError(UniretError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


#: What to do about an OSError, by errno (the path and the system's wording come first).
_ERRNO_ADVICE = {
    errno.ENOSPC: "free some space (or choose an output on another disk) and re-run",
    errno.EDQUOT: "free some space (or choose an output on another disk) and re-run",
    errno.EFBIG: "the file grew over a size limit; choose an output on another disk or raise the limit",
    errno.EACCES: "check the permissions, or choose a path you can read and write",
    errno.EPERM: "check the permissions, or choose a path you can read and write",
    errno.EROFS: "the file system is read-only; choose an output path on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.EISDIR: "a directory is where a file was expected; check the path",
    errno.ENOENT: "check the path",
    errno.ELOOP: "the path has a symbolic-link loop; check the path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "too many open files; raise `ulimit -n` or use fewer --workers",
    errno.ENFILE: "too many open files; raise `ulimit -n` or use fewer --workers",
    errno.EIO: "the disk reported an I/O error; check it and re-run",
    errno.ENOMEM: "out of memory; use a smaller --batch-size, fewer --workers or a machine with more memory",
}


def _os_line(exc: OSError) -> str:
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    what = (exc.strerror or str(exc)).rstrip(".")
    advice = _ERRNO_ADVICE.get(exc.errno, "check the path and re-run")
    return f"{where + ': ' if where else ''}{what[:1].lower() + what[1:]}; {advice}"


def _module_of(exc: BaseException) -> str:
    return type(exc).__module__.split(".")[0]


def describe(exc: BaseException) -> tuple[str, int] | None:
    """``(one line, exit code)`` for an expected failure class, else None (a bug: keep the traceback)."""
    if isinstance(exc, UniretError):
        return str(exc), exc.exit_code
    module = _module_of(exc)
    text = " ".join(str(exc).split())
    if module == "PIL" and type(exc).__name__ == "DecompressionBombError":
        return f"image over Pillow's pixel limit (a decompression bomb?): {text[:160]}", 1
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        _, dst, why = exc.args[0][0]  # copytree collects (source, destination, reason) per file
        full = "No space left on device" in str(why)
        return f"{dst}: {why}; {_ERRNO_ADVICE[errno.ENOSPC] if full else 'check the path and re-run'}", 1
    if isinstance(exc, OSError):
        if module == "PIL" or type(exc).__name__ == "UnidentifiedImageError":
            return f"cannot decode an image ({text[:160]}); check the image file", 1
        return _os_line(exc), 1
    if "No space left on device" in text:
        return f"no space left on device ({text[:120]}); {_ERRNO_ADVICE[errno.ENOSPC]}", 1
    if module == "lmdb":
        return f"LMDB error ({text[:160]}); the store or index may be damaged: re-create it", 1
    if module == "safetensors" or type(exc).__name__ == "SafetensorError":
        return f"damaged weights file ({text[:160]}); re-export or re-create the model", 1
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg} at line {exc.lineno}); fix or re-create the file", 1
    if isinstance(exc, UnicodeDecodeError):
        return f"a file that should be UTF-8 text is not ({exc.reason}); check the input files", 1
    if isinstance(exc, RecursionError):  # deeply nested input that a reader did not catch itself
        return "an input nested too deeply to read (deeply nested JSON?); check the input files", 1
    if isinstance(exc, MemoryError):
        return _ERRNO_ADVICE[errno.ENOMEM][:1].upper() + _ERRNO_ADVICE[errno.ENOMEM][1:], 1
    if isinstance(exc, RuntimeError) and "faiss" in text.lower():
        last = next((part.strip() for part in reversed(str(exc).strip().splitlines()) if part.strip()), text)
        return f"Faiss error ({last[:200]}); the index file may be damaged, or the options do not fit the data", 1
    return None

