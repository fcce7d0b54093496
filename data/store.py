"""The packed LMDB image store: every image of a collection resized and re-encoded once.

Layout of the LMDB (keys are ASCII):

    meta                         JSON: format, domains -> splits -> counts, pack options, skipped images
    rec/<domain>/<split>         JSON list of the split's records ``{"path", "class_ids", "extra"?}``
    img/<domain>/<split>/<pos>   encoded image bytes of record ``pos`` (8-digit, zero-padded)

An image that could not be decoded while packing has no ``img/`` key; its record stays, so
positions (and therefore ids everywhere downstream) are the same as in the folder, and readers
get :class:`~uniret.errors.ImageDecodeError` for it, as they would for the corrupt file.

Packing writes into ``OUT.partial`` (:class:`uniret.utils.PartialDir`, keyed by the collection's
records and the options) and renames it to ``OUT`` when complete: a finished store never exists
half-written under its final name, and re-running an interrupted pack continues with the images
that have no key yet.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import lmdb
from PIL import Image

from .. import testing
from ..errors import ImageDecodeError, UniretError
from ..guards import claim_output, in_range, is_disk_full
from ..safeio import check_lmdb, parse_json, read_contained, settle_lmdb
from ..utils import PartialDir, logger, progress_bar, stable_hash
from .collection import SPLITS, Collection, FolderCollection, Item, Record

FORMAT = "uniret-lmdb/1"
COMMIT_EVERY = 256  # images per write transaction
IMAGE_FORMATS = ("jpeg", "png")
_SKIPPED_SO_FAR = b"skipped-partial"  # the skipped list of an unfinished pack (becomes meta["skipped"])


def _img_key(domain: str, split: str, position: int) -> bytes:
    return f"img/{domain}/{split}/{position:08d}".encode()


_READERS: dict[tuple, lmdb.Environment] = {}


def _reader_env(path: Path) -> lmdb.Environment:
    """One read-only environment per process and store file (LMDB allows one open per process)."""
    real = path.resolve()
    check_lmdb(real, "packed store")  # a truncated file would crash the process (SIGBUS) when read
    key = (os.getpid(), str(real), (real / "data.mdb").stat().st_ino)
    env = _READERS.get(key)
    if env is None:
        for old in [k for k in _READERS if k[0] != key[0]]:
            # Inherited through fork: close our copy (lock=False, so the parent's is untouched);
            # LMDB refuses a second open of the same file in one process.
            _READERS.pop(old).close()
        for old in [k for k in _READERS if k[1] == key[1]]:
            _READERS.pop(old)  # the store was replaced on disk; the old handle stays valid for its users
        env = lmdb.open(str(real), readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
        _READERS[key] = env
    return env


class LmdbCollection(Collection):
    """Read a packed store. The LMDB environment opens lazily in each process (read-only, no
    lock), so the object can be pickled into DataLoader workers, forked or spawned."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self._env = None
        self._pid = None
        meta = self._get(b"meta")
        if meta is None:
            raise UniretError(f"{self.root}: LMDB has no uniret metadata; make it with `uniret data pack`")
        self.meta = self._json(meta, "meta")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise UniretError(f"{self.root}: not a uniret packed store (format {FORMAT}); make one with `uniret data pack`")
        domains = self.meta.get("domains")
        if not isinstance(domains, dict) or not all(isinstance(v, dict) for v in domains.values()):
            raise UniretError(f"{self.root}: damaged store metadata (domains); re-pack the collection")
        self.domains = sorted(domains)
        self._records: dict[tuple[str, str], list[Record]] = {}

    # Pickling drops the open environment; each process opens its own.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None
        state["_pid"] = None
        return state

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env = _reader_env(self.root)
            self._pid = os.getpid()
        return self._env

    def _get(self, key: bytes) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            return txn.get(key)

    def _json(self, raw: bytes, key: str):
        """A metadata value; JSON only (anything else, e.g. a planted pickle, is a damaged store)."""
        try:
            return parse_json(raw, key)
        except ValueError:
            raise UniretError(f"{self.root}: damaged store ({key} is not JSON); re-pack the collection") from None

    def splits(self, domain: str) -> list[str]:
        return [s for s in SPLITS if s in self.meta["domains"].get(domain, {})]

    def records(self, domain: str, split: str) -> list[Record]:
        key = (domain, split)
        if key not in self._records:
            raw = self._get(f"rec/{domain}/{split}".encode())
            if raw is None:
                raise UniretError(f"{self.root}: no split {domain}/{split} in the store")
            try:
                self._records[key] = [Record(r["path"], tuple(int(c) for c in r["class_ids"]), dict(r.get("extra") or {}))
                                      for r in self._json(raw, f"rec/{domain}/{split}")]
            except (TypeError, KeyError, ValueError):
                raise UniretError(f"{self.root}: damaged records of {domain}/{split}; re-pack the collection") from None
        return self._records[key]

    def get_image_bytes(self, domain: str, split: str, position: int) -> bytes:
        data = self._get(_img_key(domain, split, position))
        if data is None:
            raise ImageDecodeError(f"{domain}/{split}/{position}: image was skipped when packing (unreadable)")
        return data

    def content_key(self, items) -> str:
        """The store file's size and modification time (a store is only ever replaced whole)."""
        st = (self.root / "data.mdb").stat()
        return stable_hash([str(self.root.resolve()), st.st_size, st.st_mtime_ns])

    @property
    def skipped(self) -> list[dict]:
        return self.meta.get("skipped", [])


@dataclass(frozen=True)
class PackOptions:
    max_side: int = 256
    quality: int = 90
    image_format: str = "jpeg"

    def to_json(self) -> dict:
        return {"max_side": self.max_side, "quality": self.quality, "format": self.image_format}


def encode_image(data: bytes, opts: PackOptions) -> bytes:
    """Decode, shrink so that the longer side is at most ``max_side`` (never enlarge), re-encode."""
    from .images import decode_image

    img = decode_image(data)
    w, h = img.size
    scale = opts.max_side / max(w, h)
    if scale < 1:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if opts.image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=opts.quality, optimize=False)
    return buf.getvalue()


def _encode_job(args: tuple[str, str, PackOptions]) -> tuple[bytes | None, str | None]:
    image_root, rel, opts = args
    try:
        return encode_image(read_contained(image_root, rel), opts), None
    except UniretError as exc:  # ImageDecodeError, UnsafePath (outside the root, a FIFO, a device, too big)
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read ({exc.strerror or exc})"


def _open_writable(path: Path, map_size: int) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=map_size, subdir=True, max_dbs=0, sync=True, metasync=True)


def _put_batch(env: lmdb.Environment, batch: list[tuple[bytes, bytes]]) -> lmdb.Environment:
    """Write one transaction; grow the map when it is full (and retry the whole batch)."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for k, v in batch:
                    txn.put(k, v)
            return env
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def pack_fingerprint(src: FolderCollection, domains: dict, opts: PackOptions) -> dict:
    """What a packed store depends on: the records of every split, where the images are and what they
    are now (sizes and modification times), the options. An interrupted pack resumes only into a
    partial store of the same fingerprint."""
    records = {f"{d}/{s}": [r.to_json() for r in src.records(d, s)] for d in domains for s in domains[d]}
    items = [Item(r.path, d, s, i) for d in domains for s in domains[d] for i, r in enumerate(src.records(d, s))]
    return {"format": FORMAT, "domains": domains, "options": opts.to_json(), "records": stable_hash(records),
            "image_root": str(src.image_root.resolve()), "files": src.content_key(items)}


def is_packed_store(path: Path) -> bool:
    """A store that ``uniret data pack`` made (an LMDB whose metadata says so)."""
    try:
        LmdbCollection(path)
    except UniretError:
        return False
    return True


def pack(root: str | Path, out: str | Path, opts: PackOptions = PackOptions(), workers: int = 0,
         info_dir: str = "info", image_root: str | None = None, overwrite: bool = False) -> dict:
    """Pack a collection folder into an LMDB store; returns a summary (counts, skipped images).

    Resumable: an interrupted run leaves ``OUT.partial``; running again with the same collection,
    images and options keeps the images already written and packs the rest (anything changed starts
    over). ``out`` must be new, empty, or (with ``overwrite``) a packed store, which is replaced when
    the new one is complete (never before); never inside the collection. Record paths that leave
    the image root, FIFOs, devices and unreadable images are skipped and listed. A full disk removes
    the partial store.
    """
    src = FolderCollection(root, info_dir=info_dir, image_root=image_root)
    out = Path(out)
    _check_pack_args(opts, workers)
    with claim_output(out, "packed store", is_packed_store, inputs=[src.root, src.image_root], overwrite=overwrite,
                      option="OUT", flag="--overwrite"):
        domains = {d: {s: len(src.records(d, s)) for s in src.splits(d)} for d in src.domains}
        partial = PartialDir(out, pack_fingerprint(src, domains, opts))
        try:
            summary = _pack_into(partial, src, domains, opts, workers)
        except BaseException as exc:
            if is_disk_full(exc):
                partial.discard()
            raise
        partial.publish()
    return summary


def _pack_into(partial: PartialDir, src: FolderCollection, domains: dict, opts: PackOptions, workers: int) -> dict:
    env = _open_writable(partial.path, map_size=1 << 30)
    skipped = _write_records(env, src, domains)
    todo = _missing_images(env, domains, skipped)
    total = sum(n for sp in domains.values() for n in sp.values())
    if len(todo) < total - len(skipped):
        logger.info("resuming: %d of %d images already packed", total - len(todo) - len(skipped), total)
    env = _pack_images(env, src, todo, opts, workers, skipped)
    skipped.sort(key=lambda r: (r["domain"], SPLITS.index(r["split"]), r["position"]))
    meta = {"format": FORMAT, "domains": domains, "options": opts.to_json(), "skipped": skipped,
            "source": str(src.root.resolve())}
    with env.begin(write=True) as txn:
        txn.delete(_SKIPPED_SO_FAR)
        txn.put(b"meta", json.dumps(meta).encode())
    env.sync(True)
    env.close()
    settle_lmdb(partial.path)
    return {"images": total, "packed": total - len(skipped), "skipped": skipped, "domains": domains}


def _check_pack_args(opts: PackOptions, workers: int) -> None:
    in_range(workers, "--workers", 0, 256)
    in_range(opts.max_side, "--max-side", 8, 16_384)
    in_range(opts.quality, "--quality", 1, 100)
    if opts.image_format not in IMAGE_FORMATS:
        raise UniretError(f"--image-format must be {' or '.join(IMAGE_FORMATS)}, not {opts.image_format!r}")


def _record_json(r: Record) -> dict:
    out = {"path": r.path, "class_ids": list(r.class_ids)}
    if r.extra:
        out["extra"] = dict(r.extra)  # the record's own fields (url, caption, ...) travel with it
    return out


def _write_records(env: lmdb.Environment, src: FolderCollection, domains: dict) -> list[dict]:
    """Write every split's records (small, rewritten on resume); return the images skipped so far."""
    _put_batch(env, [(f"rec/{d}/{s}".encode(),
                      json.dumps([_record_json(r) for r in src.records(d, s)]).encode())
                     for d in domains for s in domains[d]])
    with env.begin() as txn:
        prev = txn.get(_SKIPPED_SO_FAR)
    return parse_json(prev, "skipped list") if prev else []


def _missing_images(env: lmdb.Environment, domains: dict, skipped: list[dict]) -> list[tuple[str, str, int]]:
    """(domain, split, position) of every image neither packed nor skipped yet."""
    skipped_keys = {(s["domain"], s["split"], s["position"]) for s in skipped}
    with env.begin() as txn:
        return [(d, s, i) for d in domains for s in domains[d] for i in range(domains[d][s])
                if (d, s, i) not in skipped_keys and txn.get(_img_key(d, s, i)) is None]


def _pack_images(env: lmdb.Environment, src: FolderCollection, todo: list[tuple[str, str, int]],
                 opts: PackOptions, workers: int, skipped: list[dict]) -> lmdb.Environment:
    """Encode the ``todo`` images (in ``workers`` processes) and commit them in batches together with
    the growing ``skipped`` list, so that a kill loses at most one batch."""
    commit_every = testing.int_setting("pack_commit_every", COMMIT_EVERY)
    batch: list[tuple[bytes, bytes]] = []

    def flush() -> None:
        nonlocal env
        batch.append((_SKIPPED_SO_FAR, json.dumps(skipped).encode()))
        env = _put_batch(env, batch)
        batch.clear()
        testing.sleep_point("pack")  # lets tests kill a real pack between commits

    jobs = ((str(src.image_root), src.record_path(d, s, i), opts) for d, s, i in todo)
    pool = get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(_encode_job, jobs, chunksize=16) if pool else map(_encode_job, jobs)
        with progress_bar("packing", len(todo)) as advance:
            for (d, s, i), (data, err) in zip(todo, results):
                if data is None:
                    skipped.append({"domain": d, "split": s, "position": i,
                                    "path": src.records(d, s)[i].path, "error": err})
                else:
                    batch.append((_img_key(d, s, i), data))
                if len(batch) >= commit_every:
                    flush()
                advance(1)
        flush()
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return env
