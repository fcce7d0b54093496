"""Webdataset input: tar shards as img2dataset writes them (``key.jpg`` + ``key.json`` + ``key.txt``).

``uniret embed --data 'shards/{00000..00099}.tar'`` expands the braces (``braceexpand``, the
webdataset convention), and every sample (consecutive members sharing a key, with one image
member) becomes an :class:`~uniret.data.collection.Item`: ``path`` = ``<shard>/<key>.<ext>``,
``position`` = its id, ``extra`` = the fields of its ``.json`` member plus its ``.txt`` as ``txt``.

Ids are positions in the ordered shard list: shard ``s`` holds ids ``offset(s) ..`` where
``offset(s)`` is the number of samples in the shards before it. A slice of the input (``--part I/N``,
a torchrun rank) takes a contiguous block of whole shards, so no shard is read by two workers; to
know its first id it needs only the sample *counts* of the earlier shards: img2dataset's
``<shard>_stats.json`` (``successes``) when present, otherwise a header-only listing of those shards
(tar headers are read and the data is seeked over, so no image or side file byte is read twice). If
a shard's own listing disagrees with its stats file, its ids still follow the stats count: missing
samples become failed rows and surplus ones are skipped, so every worker agrees on every id.

Shards are read with the standard library's ``tarfile`` rather than the ``webdataset`` package:
extraction addresses images by id (DataLoader workers, resume of the rows still missing), which
needs random access to members (offset + size from the listing), not a sequential stream; and
``tarfile``'s ``ignore_zeros`` lets a listing step over a corrupt header to the next good member.
A corrupt member is never a crash: an unreadable header or a truncated member is skipped and noted
(``ItemList.notes``, stored in the embedding store), an undecodable image is a failed row, a bad
``.json`` leaves that sample's fields out and is noted.
"""

from __future__ import annotations

import itertools
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ImageDecodeError, UniretError
from ..safeio import MAX_IMAGE_BYTES, BadFile, is_utf8_name, parse_json, read_json
from ..utils import stable_hash
from .collection import Item, ItemList, extra_fields, slice_bounds
from .images import IMAGE_EXTENSIONS

BLOCK = tarfile.BLOCKSIZE
MAX_SHARDS = 1_000_000  # a pattern naming more is refused before its list is built
SIDE_MAX_BYTES = 1 << 20  # a .json/.txt side file larger than this is noted and left out
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # webdataset's key/extension split


def is_shard_spec(text: str) -> bool:
    """Whether ``--data`` names tar shards (``x.tar`` or a brace pattern of them)."""
    return str(text).lower().endswith((".tar", ".tar.gz", ".tgz"))


_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def _range_product(spec: str) -> int:
    """How many names the numeric ranges ``{a..b[..step]}`` of a pattern multiply to (an upper bound
    on the shards it names, before anything is expanded)."""
    total = 1
    for a, b, step in _RANGE.findall(spec):
        step_size = max(1, abs(int(step or 1)))
        total *= abs(int(b) - int(a)) // step_size + 1
        if total > MAX_SHARDS:
            break
    return total


def expand_shards(spec: str) -> list[Path]:
    """The shards of a brace pattern, in order; all must exist (ids depend on the whole list)."""
    import braceexpand

    if str(spec).lower().endswith((".tar.gz", ".tgz")):
        raise UniretError(f"{spec}: compressed shards cannot be read by id; repack them as plain .tar")
    if _range_product(str(spec)) > MAX_SHARDS:  # braceexpand builds each range whole before yielding
        raise UniretError(f"{spec}: the pattern names more than {MAX_SHARDS:,} shards; use fewer, larger shards")
    try:
        paths = [Path(p) for p in itertools.islice(braceexpand.braceexpand(str(spec)), MAX_SHARDS + 1)]
    except braceexpand.UnbalancedBracesError:
        raise UniretError(f"{spec}: unbalanced braces in the shard pattern, e.g. 'shards/{{00000..00099}}.tar'") from None
    if len(paths) > MAX_SHARDS:
        raise UniretError(f"{spec}: the pattern names more than {MAX_SHARDS:,} shards; use fewer, larger shards")
    if len(set(paths)) != len(paths):
        raise UniretError(f"{spec}: the pattern names some shards twice; each shard may appear once")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UniretError(f"{missing[0]}: no such shard ({len(missing)} of the {len(paths)} shards of {spec} are "
                          "missing); fix the pattern or fetch the missing shards")
    return paths


@dataclass
class ShardListing:
    """What one shard holds: its samples (key, image member, side fields) and what was skipped."""

    keys: list[str] = field(default_factory=list)
    image_ext: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _zero_or_unreadable(f, start: int, stop: int) -> bool:
    """True when bytes [start, stop) are padding (all zero); a large or non-zero gap is corrupt."""
    if stop - start > SIDE_MAX_BYTES:
        return False
    f.seek(start)
    return not f.read(stop - start).strip(b"\0")


def _read_side(f, name: str, member: tarfile.TarInfo, notes: list[str]):
    if member.size > SIDE_MAX_BYTES:
        notes.append(f"{name}: side file of {member.size} bytes left out (over {SIDE_MAX_BYTES})")
        return None
    f.seek(member.offset_data)
    data = f.read(member.size)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        notes.append(f"{name}: side file is not UTF-8 text; left out")
        return None


def list_shard(path: Path, label: str, read_side: bool = True) -> ShardListing:
    """List a shard's samples from its tar headers (``read_side``: also read the .json/.txt members).

    A corrupt region (an invalid header, garbage between members) is stepped over to the next valid
    header and noted, as is a member cut short by the end of the file.
    """
    out = ShardListing()
    size = path.stat().st_size
    current: dict | None = None

    def close_sample() -> None:
        if current is None:
            return
        if current["image"] is None:
            out.notes.append(f"{label}/{current['key']}: no image member; sample skipped")
            return
        ext, off, n = current["image"]
        out.keys.append(current["key"])
        out.image_ext.append(ext)
        out.offsets.append(off)
        out.sizes.append(n)
        out.extra.append(current["extra"])

    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
        except tarfile.TarError as exc:
            out.notes.append(f"{label}: not a readable tar file ({exc}); shard skipped")
            return out
        expected = 0
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, ValueError) as exc:
                out.notes.append(f"{label}: unreadable from byte {expected} ({exc}); the rest is skipped")
                break
            if member is None:
                break
            if member.offset > expected and not _zero_or_unreadable(f, expected, member.offset):
                out.notes.append(f"{label}: bytes {expected}-{member.offset} unreadable (corrupt tar header); "
                                 "members there skipped")
            expected = member.offset_data + -(-member.size // BLOCK) * BLOCK
            if not member.isfile():
                continue
            name = f"{label}/{member.name}"
            if member.offset_data + member.size > size:
                out.notes.append(f"{name}: truncated (the shard ends inside it); skipped")
                continue
            if not is_utf8_name(member.name):
                out.notes.append(f"{name}: a member name that is not UTF-8; skipped")
                continue
            m = _KEY_EXT.match(member.name)
            if m is None:
                continue  # no extension: not part of a sample
            key, ext = m.group(1), m.group(2).lower()
            if current is None or current["key"] != key:
                close_sample()
                current = {"key": key, "image": None, "extra": {}}
            last = ext.rsplit(".", 1)[-1]
            if last in _IMAGE_EXTS:
                if current["image"] is None:
                    current["image"] = (ext, member.offset_data, member.size)
            elif read_side and last in ("json", "txt"):
                text = _read_side(f, name, member, out.notes)
                if text is None:
                    continue
                if last == "txt":
                    current["extra"]["txt"] = text.strip()
                    continue
                try:
                    obj = parse_json(text, name, "side file")
                except BadFile as exc:
                    out.notes.append(f"{str(exc).split('; ')[0]}; its fields are left out")
                    continue
                if isinstance(obj, dict):
                    current["extra"] = {**extra_fields(obj), **current["extra"]}
                else:
                    out.notes.append(f"{name}: JSON is not an object; left out")
        close_sample()
        if expected < size and not _zero_or_unreadable(f, expected, size):
            out.notes.append(f"{label}: bytes {expected}-{size} after the last member unreadable; skipped")
    return out


def _files_key(paths: list[Path]) -> str:
    stats = [p.stat() for p in paths]
    return stable_hash([[str(p.resolve()), st.st_size, st.st_mtime_ns] for p, st in zip(paths, stats)])


def _stats_count(path: Path) -> int | None:
    """img2dataset's sample count for a shard (``<name>_stats.json``: ``successes``), if present."""
    stats = path.with_name(path.name[: -len(".tar")] + "_stats.json")
    try:
        value = read_json(stats, "stats file", max_bytes=1 << 20).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class TarShards:
    """The samples of an ordered list of tar shards, listed lazily shard by shard.

    :meth:`part` lists only the shards of one slice (plus the counts of the shards before it);
    ``len()`` counts every shard. Picklable; nothing is open between calls.
    """

    def __init__(self, spec: str):
        self.spec = str(spec)
        self.paths = expand_shards(self.spec)
        if not self.paths:
            raise UniretError(f"{spec}: the pattern names no shard")
        common = Path(os.path.commonpath([str(p.resolve().parent) for p in self.paths]))
        self.labels = [p.resolve().relative_to(common).as_posix() for p in self.paths]
        self._counts: dict[int, int] = {}

    def count(self, s: int) -> int:
        """Samples (= ids) of shard ``s``: its stats file's count, else a header-only listing."""
        if s not in self._counts:
            stats = _stats_count(self.paths[s])
            self._counts[s] = stats if stats is not None else len(
                list_shard(self.paths[s], self.labels[s], read_side=False).keys)
        return self._counts[s]

    def __len__(self) -> int:
        return sum(self.count(s) for s in range(len(self.paths)))

    def key(self) -> str:
        """Identity of the input: shard names and sizes (the same on every machine holding a copy)."""
        return stable_hash([[label, p.stat().st_size] for label, p in zip(self.labels, self.paths)])

    def content_key(self) -> str:
        """The shards as they are now (sizes and modification times): part of every fingerprint."""
        return _files_key(self.paths)

    def part(self, k: int, parts: int) -> ItemList:
        """Slice ``k`` of ``parts``: a contiguous block of whole shards, with their global ids."""
        first, stop = slice_bounds(len(self.paths), k, parts)
        start = sum(self.count(s) for s in range(first))
        items: list[Item] = []
        notes: list[str] = []
        source = TarSource(self.paths, start)
        for s in range(first, stop):
            listing = list_shard(self.paths[s], self.labels[s])
            if s not in self._counts:
                stats = _stats_count(self.paths[s])
                self._counts[s] = len(listing.keys) if stats is None else stats
            want = self._counts[s]
            notes.extend(listing.notes)
            if len(listing.keys) > want:
                notes.append(f"{self.labels[s]}: {len(listing.keys)} samples but its stats file says {want}; "
                             f"the last {len(listing.keys) - want} skipped")
            for j in range(want):
                pos = start + len(items)
                if j < len(listing.keys):
                    items.append(Item(f"{self.labels[s]}/{listing.keys[j]}.{listing.image_ext[j]}", position=pos,
                                      extra=listing.extra[j]))
                    source.add(s, listing.offsets[j], listing.sizes[j])
                else:  # counted by the stats file, absent from the tar: a failed row keeps ids aligned
                    items.append(Item(f"{self.labels[s]}/<missing sample {j}>", position=pos))
                    source.add(s, -1, 0)
        source.freeze()
        return ItemList(items, source=source, start=start, notes=notes,
                        span={"shards": [first, stop, len(self.paths)]})


class TarSource:
    """Image bytes of listed samples by id, read with one seek + read from their shard."""

    def __init__(self, paths: list[Path], start: int):
        self.paths = [str(p) for p in paths]
        self.start = start
        self._rows: list[tuple[int, int, int]] = []
        self.table = np.zeros((0, 3), dtype=np.int64)  # row j (id start + j): shard, offset, size

    def add(self, shard: int, offset: int, size: int) -> None:
        self._rows.append((shard, offset, size))

    def freeze(self) -> None:
        """Turn the rows added into one array (small to pickle into DataLoader workers)."""
        self.table = np.asarray(self._rows, dtype=np.int64).reshape(-1, 3)
        self._rows = []

    def content_key(self, items) -> str:
        """See :meth:`TarShards.content_key` (the shards this source reads)."""
        return _files_key([Path(p) for p in self.paths])

    def get_image_bytes(self, domain, split, position: int) -> bytes:
        shard, offset, size = (int(v) for v in self.table[position - self.start])
        if size > MAX_IMAGE_BYTES:  # read whole into memory: bounded like any image file
            raise ImageDecodeError(f"sample {position}: {size:,} bytes is over the {MAX_IMAGE_BYTES >> 20} MB limit "
                                   "for an image")
        if offset < 0:
            raise ImageDecodeError(f"sample {position} is counted by {Path(self.paths[shard]).name}'s stats "
                                   "file but missing from the tar")
        with open(self.paths[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ImageDecodeError(f"{self.paths[shard]}: sample {position} is cut short (the shard was truncated)")
        return data

