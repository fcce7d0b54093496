"""Which part of a store each process writes, where, and who writes the manifest (no gather).

An embedding run writes ``K`` parts, slice ``k`` of ``K`` of its input each (``ItemList.part`` /
``TarShards.part``: contiguous ids; whole shards for tar input). One process writes one part.
Under ``torchrun`` with ``W`` ranks, rank ``r`` writes its own part and rank 0 then lists the
finished parts in the manifest: no vector crosses processes, and every rank needs ``out`` on a
filesystem they all see. ``--part I/N`` (Slurm arrays, a list of machines) writes a part directory
holding slice ``I`` of ``N`` (with ``W`` ranks: slices ``I*W .. I*W+W-1`` of ``N*W``, the same rows),
and ``uniret store merge`` joins the directories.

Layout while running: ``<out>.partial/`` (marker: the run's fingerprint) holds
``parts/<name>.partial`` per unfinished part (:class:`~uniret.embed.store.writer.PartWriter`) and
``parts/<name>`` per finished one; rank 0 writes ``manifest.json`` and renames it to ``out``.
A re-run with the same fingerprint keeps the finished parts and resumes the unfinished ones.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import UniretError, UsageError
from ...utils import PartialDir, read_json
from .layout import part_name, store_fingerprint
from .reader import EmbeddingStore, open_finished
from .writer import PartWriter, finished_part, part_entry, part_fingerprint, write_manifest


def parse_part(text: str | None) -> tuple[int, int]:
    """``--part I/N`` -> (I, N), 0 <= I < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UsageError(f"--part {text!r}: write I/N, e.g. --part 0/4 for the first of 4 parts")
    index, parts = int(m.group(1)), int(m.group(2))
    if parts < 1 or index >= parts:
        raise UsageError(f"--part {text}: I must be 0..N-1 and N at least 1 (e.g. 0/{max(parts, 1)})")
    return index, parts


class EmbedJob:
    """One process's share of an embedding run into ``out``: slice ``k`` of ``K``."""

    def __init__(self, out: str | Path, items, model: dict, dim: int, dtype: str, source: dict | None,
                 part: tuple[int, int] = (0, 1), rank: int = 0, world: int = 1):
        self.out = Path(out)
        self.items, self.model, self.dim, self.dtype, self.source = items, model, dim, dtype, source or {}
        index, parts = part
        self.parts = parts * world
        self.k = index * world + rank
        self.planned = [part_name(k, self.parts) for k in range(index * world, (index + 1) * world)]
        # every process computes the same fingerprint: the whole input's items and files, so that a
        # changed image anywhere starts the run over rather than mixing old and new parts
        fingerprint = store_fingerprint(items, dim, dtype, model.get("config_hash"), source, files=items.content_key())
        # one process writing the whole store keeps the plain store fingerprint (the eval cache asks for it)
        self.fingerprint = fingerprint if self.parts == 1 else dict(fingerprint, slices=[
            index * world, (index + 1) * world, self.parts])
        self.header = {"model_hash": model.get("config_hash"), "source_key": fingerprint["items"],
                       "total": fingerprint["count"]}
        self.partial = self.out.with_name(self.out.name + ".partial")
        self._dir: PartialDir | None = None

    def finished(self) -> EmbeddingStore | None:
        """The output when an earlier run already wrote exactly this."""
        return open_finished(self.out, self.fingerprint, whole=False)

    def prepare(self, restart: bool) -> bool:
        """Open (or resume) ``<out>.partial``; one process (rank 0) calls this before the others
        open their parts. Returns whether an earlier run's partial directory was resumed."""
        self._dir = PartialDir(self.out, self.fingerprint, restart=restart)
        return self._dir.resumed

    def open_part(self, restart: bool, k: int | None = None) -> PartWriter | None:
        """This process's part writer (of part ``k`` when given: one driver writing every part, as
        ``--engine ray`` does), or None when the part is already finished."""
        k = self.k if k is None else k
        items = self.items.part(k, self.parts)
        name = part_name(k, self.parts)
        fingerprint = part_fingerprint(items, k, self.parts, self.dim, self.dtype, self.header)
        if not restart and finished_part(self.partial / "parts" / name, fingerprint) is not None:
            return None
        return PartWriter(self.partial / "parts" / name, items, k, self.parts, self.dim, self.dtype,
                          self.header, restart=restart)

    def publish(self) -> EmbeddingStore:
        """List the run's finished parts in the manifest and move the output into place (rank 0)."""
        entries = []
        for name in self.planned:
            path = self.partial / "parts" / name / "part.json"
            try:
                info = read_json(path)
            except (OSError, ValueError):
                raise UniretError(f"{path.parent}: part missing after every process finished; re-run to resume") from None
            if (info.get("model"), info.get("source_key")) != (self.header["model_hash"], self.header["source_key"]):
                raise UniretError(f"{path.parent}: a part of another model or input; re-run with --restart")
            entries.append(part_entry(info))
        write_manifest(self.partial, entries, self.dim, self.dtype, self.model, self.source, self.header["source_key"],
                       self.header["total"], self.fingerprint)
        return EmbeddingStore(self._dir.publish(), whole=False)
