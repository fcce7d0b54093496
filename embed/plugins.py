"""Registries that other packages extend through entry points.

A :class:`Registry` maps names to small records: uniret's built-in ones, plus those that installed
packages declare under an entry-point group (``uniret.backbones``, ``uniret.weights``), e.g. in the
plugin's ``pyproject.toml``::

    [project.entry-points."uniret.backbones"]
    mysrc = "mypackage.uniret_plugin:SOURCE"

The entry point names the record (or a function returning it). Plugins are listed from package
metadata on first use and imported only when their record is needed; one that fails to import, or
gives something that is not a record, is a one-line warning and is left out, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Generic, TypeVar

logger = logging.getLogger("uniret")

Record = TypeVar("Record")


class Registry(Mapping[str, Record], Generic[Record]):
    """Built-in records plus entry-point plugins of ``group``, in that order; a built-in name wins."""

    def __init__(self, group: str, record_type: type, what: str):
        self.group = group
        self.record_type = record_type
        self.what = what
        self._builtins: dict[str, Record] = {}
        self._plugins: dict[str, Record] = {}  # imported plugins
        self._entries: dict[str, metadata.EntryPoint] | None = None  # listed, not yet imported

    def register(self, name: str, record: Record) -> Record:
        """Add a built-in record (a plugin registers through its entry point instead)."""
        _check(self.record_type, name, record)
        self._builtins[name] = record
        return record

    def refresh(self) -> None:
        """Forget the plugins seen so far (after installing one into a running process; tests)."""
        self._plugins = {}
        self._entries = None

    # -- Mapping -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Record:
        if name in self._builtins:
            return self._builtins[name]
        if name in self._plugins:
            return self._plugins[name]
        entry = self._listed().pop(name, None)
        record = None if entry is None else self._load(entry)
        if record is None:
            raise KeyError(name)
        self._plugins[name] = record
        return record

    def __iter__(self) -> Iterator[str]:
        names = [*self._builtins, *self._plugins, *self._listed()]
        return iter(dict.fromkeys(names))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._plugins or name in self._listed()

    def records(self) -> list[Record]:
        """Every record, importing every plugin (broken ones: a warning each, then left out)."""
        out = []
        for name in list(self):
            try:
                out.append(self[name])
            except KeyError:
                pass
        return out

    # -- internals -----------------------------------------------------------------------------
    def _listed(self) -> dict[str, metadata.EntryPoint]:
        if self._entries is None:
            try:
                entries = list(metadata.entry_points(group=self.group))
            except Exception as exc:  # noqa: BLE001 - unreadable package metadata must not stop uniret
                logger.warning("cannot list the %r entry points (%s); no %s plugins used", self.group,
                               _why(exc), self.what)
                entries = []
            self._entries = {e.name: e for e in entries if e.name not in self._builtins}
        return self._entries

    def _load(self, entry: metadata.EntryPoint) -> Record | None:
        dist = getattr(entry, "dist", None)
        where = f"{self.group} plugin {entry.name!r} ({entry.value}" + (f", package {dist.name})" if dist else ")")
        try:
            obj = entry.load()
            if callable(obj) and not isinstance(obj, self.record_type):
                obj = obj()
            _check(self.record_type, entry.name, obj)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is a warning, never a crash
            logger.warning("%s failed to load and is ignored: %s", where, _why(exc))
            return None
        return obj


def _check(record_type: type, name: str, record) -> None:
    if not isinstance(record, record_type):
        raise TypeError(f"{name!r} gives a {type(record).__name__}, not a {record_type.__name__}")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
