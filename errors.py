"""User-facing errors.

A :class:`UniretError` carries one line that says what is wrong and what to do. The CLI prints it
without a traceback and exits with ``exit_code``; ``UNIRET_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations


class UniretError(Exception):
    """An expected failure caused by input (paths, files, options); the message is shown as is."""

    exit_code = 1


class UsageError(UniretError):
    """Options that do not fit together or have bad values."""

    exit_code = 2


class ImageDecodeError(UniretError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""
