"""``uniret store merge``: join part directories (``uniret embed --part I/N``) into one store.

The vectors are not copied: each part's ``embeddings.npy`` and ``metadata.parquet`` are hard-linked
into ``OUT/parts/`` (same filesystem; ``copy=True`` copies instead) and a new manifest lists them.
The inputs stay as they were. Merging refuses, with one line each, parts of another model, size or
type of vector, or source; a missing or damaged part file; parts whose slices overlap; and parts
that leave ids uncovered (it names the slices still to embed).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from fractions import Fraction
from pathlib import Path

from ...errors import UniretError
from ...guards import claim_output
from ...utils import PartialDir, stable_hash
from .layout import FORMAT, FORMAT_V1, PART_FILES, check_tiling, is_store
from .reader import EmbeddingStore, StorePart
from .writer import write_manifest

logger = logging.getLogger("uniret")


def _same(stores: list[EmbeddingStore], what: str, value, hint: str) -> None:
    first = value(stores[0])
    for s in stores[1:]:
        if value(s) != first:
            raise UniretError(f"{s.path}: {what} {value(s)}, but {stores[0].path} has {first}; {hint}")


def _check_inputs(inputs: list[Path]) -> list[EmbeddingStore]:
    stores = []
    for p in inputs:
        store = EmbeddingStore(p, whole=False)
        if store.manifest.get("format") == FORMAT_V1:
            raise UniretError(f"{p}: a one-file store (format 1) cannot be merged; re-embed it with --part I/N")
        stores.append(store)
    hint = "merge only parts of one embedding run (same model, --dtype and --data)"
    _same(stores, "was embedded by model", lambda s: s.model_hash, hint)
    _same(stores, "has embeddings of dim", lambda s: s.dim, hint)
    _same(stores, "has embeddings of type", lambda s: s.dtype, hint)
    _same(stores, "was embedded from source", lambda s: s.manifest.get("source_key"), hint)
    return stores


def _gap_message(entries: list[dict]) -> str:
    """Which slices no part covers, in the terms of the finest split given."""
    finest = max(e["slice"][1] for e in entries)
    covered = [(Fraction(e["slice"][0], e["slice"][1]), Fraction(e["slice"][0] + 1, e["slice"][1])) for e in entries]
    missing = [k for k in range(finest)
               if not any(lo <= Fraction(k, finest) and Fraction(k + 1, finest) <= hi for lo, hi in covered)]
    shown = ", ".join(f"{k}/{finest}" for k in missing[:8]) + (" ..." if len(missing) > 8 else "")
    return (f"the parts do not cover the whole source: no part holds slice(s) {shown}; "
            f"embed them with `uniret embed ... --part I/{finest}` and merge again")


def _link(src: Path, dest: Path, copy: bool) -> None:
    if copy:
        shutil.copy2(src, dest)
        return
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise UniretError(f"cannot hard-link {src} into {dest.parent} ({exc.strerror}); put --out on the "
                              "filesystem of the parts, or pass --copy") from None
        raise


def merge_parts(inputs: list[str | Path], out: str | Path, copy: bool = False, overwrite: bool = False) -> EmbeddingStore:
    """Join part directories (or stores written in parts) into the store ``out``; returns it.

    ``out`` must be new, empty or (with ``overwrite``) another embedding store, never one of the inputs.
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if not inputs:
        raise UniretError("give the part directories to merge")
    with claim_output(out, "embedding store", is_store, inputs, overwrite=overwrite):
        return _merge(inputs, out, copy)


def _merge(inputs: list[Path], out: Path, copy: bool) -> EmbeddingStore:
    stores = _check_inputs(inputs)
    parts: list[tuple[EmbeddingStore, StorePart, dict]] = []
    for store in stores:
        for part in store.parts:
            for name in PART_FILES:
                part.file(name)
            part.embeddings  # noqa: B018 - checks shape and type against the manifest
            parts.append((store, part, part.entry))
    entries = [e for _, _, e in parts]
    if not check_tiling([(f"{s.path}/{e['name']}", *e["slice"]) for s, _, e in parts]):
        raise UniretError(_gap_message(entries))
    totals = {s.manifest.get("total") for s in stores} - {None}
    count = sum(e["count"] for e in entries)
    if len(totals) == 1 and count != next(iter(totals)):
        raise UniretError(f"the parts hold {count} ids but their source has {next(iter(totals))}; re-embed the parts")
    first = stores[0].manifest
    fingerprint = {"format": FORMAT, "model": stores[0].model_hash, "dim": stores[0].dim, "dtype": stores[0].dtype,
                   "source_key": first.get("source_key"),
                   "parts": stable_hash(sorted(p.info.get("fingerprint", {}).get("items", "") for _, p, _ in parts))}
    job = PartialDir(out, fingerprint, restart=True)
    try:
        for _, part, entry in parts:
            dest = job.path / "parts" / entry["name"]
            dest.mkdir(parents=True)
            _link(part.file("embeddings.npy"), dest / "embeddings.npy", copy)
            _link(part.file("metadata.parquet"), dest / "metadata.parquet", copy)
            shutil.copy2(part.file("part.json"), dest / "part.json")
        source = dict(first.get("source") or {}, merged_from=[str(p.resolve()) for p in inputs])
        write_manifest(job.path, entries, stores[0].dim, stores[0].dtype, first.get("model") or {}, source,
                       first.get("source_key"), first.get("total"), fingerprint)
    except BaseException:
        shutil.rmtree(job.path, ignore_errors=True)  # links only: the parts themselves are untouched
        raise
    merged = EmbeddingStore(job.publish())
    logger.info("merged %d parts of %d input(s) into %s: %d x %d %s (%s)", len(parts), len(inputs), out,
                merged.count, merged.dim, merged.dtype, "copied" if copy else "hard-linked, no copy of the vectors")
    return merged
