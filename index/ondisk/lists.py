"""Faiss on-disk inverted lists: merge IVF shards (and a previous version's lists) into one
``lists.ivfdata`` with bounded memory, and open an index whose lists are memory-mapped.

Faiss's own ``faiss.contrib.ondisk.merge_ondisk`` maps every shard and the output file whole and
copies through the maps, so the merging process's RSS grows with the lists (measured: +125 MB for
106 MB of lists; a 10M-vector ivf-flat index has 2.6 GB). Here
each source's lists are read one window of lists at a time with plain reads, and the output is
written sequentially in the compact layout that ``OnDiskInvertedLists.set_all_lists_sizes`` defines
(list after list, each its codes then its ids); an ``OnDiskInvertedLists`` with those sizes then
describes the file to Faiss. Searching maps ``lists.ivfdata`` read-only (``do_mmap``): only the
lists a query probes are read, and only they occupy memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import UniretError
from ..layout import check_index_shape, check_regular, read_index, version_file
from .vectors import sync_and_evict

IVFDATA = "lists.ivfdata"
ID_BYTES = 8


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class ListSource:
    """Inverted lists stored back to back in a file (a shard's ``ivf.faiss`` or a version's
    ``lists.ivfdata``), read by plain reads, a window of lists at a time."""

    def __init__(self, path: Path, invlists, code_size: int, file_size: int):
        self.path, self.code_size = Path(path), int(code_size)
        entries = [invlists.lists.at(i) for i in range(invlists.nlist)]
        self.sizes = np.array([e.size for e in entries], dtype=np.int64)
        self.offsets = np.array([e.offset if e.size else 0 for e in entries], dtype=np.int64)
        nonempty = np.flatnonzero(self.sizes)
        ends = self.offsets + self.sizes * (self.code_size + ID_BYTES)
        if len(nonempty) and (np.any(self.offsets[nonempty[1:]] != ends[nonempty[:-1]]) or ends[nonempty[-1]] > file_size):
            raise UniretError(f"{self.path}: inverted lists are not stored back to back within the file (damaged?); "
                              "rebuild it")
        self.offsets[self.sizes == 0] = np.maximum.accumulate(np.where(self.sizes > 0, ends, 0))[self.sizes == 0]

    @classmethod
    def of_shard(cls, path: Path, nlist: int, code_size: int) -> ListSource:
        """A shard written by ``faiss.write_index``: read with IO_FLAG_MMAP, which maps the file
        without touching it, only to learn where each list is."""
        import faiss

        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError as exc:
            raise UniretError(f"shard {path.parent} is damaged ({_last_line(exc)}); delete it and re-run to "
                              "encode it again") from None
        if ivf.nlist != nlist or ivf.code_size != code_size:
            raise UniretError(f"shard {path.parent} is damaged ({ivf.nlist} lists of {ivf.code_size}-byte codes, "
                              f"the build has {nlist} of {code_size}); delete it and re-run to encode it again")
        return cls(path, faiss.downcast_InvertedLists(ivf.invlists), code_size, path.stat().st_size)

    @classmethod
    def of_version(cls, version_dir: Path, manifest: dict) -> ListSource:
        index = read_version_index(version_dir, manifest, mmap=False)
        ivf = _ivf(index)
        data = version_file(version_dir, manifest["on_disk"].get("ivfdata"), "lists file")
        return cls(data, _ivf_lists(ivf), ivf.code_size, data.stat().st_size)

    def read_window(self, l0: int, l1: int) -> tuple[np.ndarray, int]:
        start = int(self.offsets[l0])
        end = int(self.offsets[l1 - 1] + self.sizes[l1 - 1] * (self.code_size + ID_BYTES))
        with open(self.path, "rb") as f:
            buf = os.pread(f.fileno(), end - start, start)
        if len(buf) != end - start:
            raise UniretError(f"{self.path} is truncated; rebuild it")
        return np.frombuffer(buf, dtype=np.uint8), start

    def list_in(self, window: tuple[np.ndarray, int], lst: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, code_size) uint8, ids (n,) int64) of list ``lst`` inside a window."""
        buf, start = window
        n, o = int(self.sizes[lst]), int(self.offsets[lst]) - start
        codes = buf[o:o + n * self.code_size].reshape(n, self.code_size)
        ids = buf[o + n * self.code_size:o + n * (self.code_size + ID_BYTES)].view(np.int64)
        return codes, ids


def write_lists(path: Path, sources: list[ListSource], nlist: int, code_size: int, window_bytes: int,
                drop: np.ndarray | None = None) -> np.ndarray:
    """Write the lists of all ``sources`` (list by list, sources in order) to ``path`` in the compact
    layout, leaving out ids in sorted ``drop``; returns the size of every list."""
    entry = code_size + ID_BYTES
    cum = np.cumsum(sum(s.sizes for s in sources) * entry)
    sizes = np.zeros(nlist, dtype=np.uint64)
    with open(path, "wb", buffering=8 << 20) as f:
        l0 = 0
        while l0 < nlist:
            base = int(cum[l0 - 1]) if l0 else 0
            l1 = min(nlist, max(l0 + 1, int(np.searchsorted(cum, base + window_bytes, side="right"))))
            windows = [s.read_window(l0, l1) for s in sources]
            for lst in range(l0, l1):
                parts = [s.list_in(w, lst) for s, w in zip(sources, windows)]
                codes = [c for c, _ in parts]
                ids = [i for _, i in parts]
                if drop is not None and len(drop):
                    keeps = [~_member(i, drop) for i in ids]
                    codes = [c[k] for c, k in zip(codes, keeps)]
                    ids = [i[k] for i, k in zip(ids, keeps)]
                for c in codes:
                    f.write(c.tobytes())
                for i in ids:
                    f.write(i.tobytes())
                sizes[lst] = sum(len(i) for i in ids)
            l0 = l1
        sync_and_evict(f)
    return sizes


def _member(ids: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_values, ids), len(sorted_values) - 1)
    return sorted_values[pos] == ids


def attach_lists(index, sizes: np.ndarray, data_bytes: int) -> None:
    """Make ``index`` (trained, empty) describe the compact lists file ``IVFDATA`` beside it."""
    import faiss

    ivf = _ivf(index)
    od = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, IVFDATA)
    sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
    od.set_all_lists_sizes(faiss.swig_ptr(sizes))
    od.totsize = int(data_bytes)
    ivf.replace_invlists(od, True)
    od.this.disown()
    index.ntotal = ivf.ntotal = int(sizes.sum())


def _ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def _ivf_lists(ivf):
    import faiss

    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise UniretError("the index manifest says on-disk, but its index.faiss holds in-RAM lists; rebuild it")
    return lists


def read_version_index(version_dir: Path, manifest: dict, mmap: bool = True):
    """The Faiss index of a version. On-disk lists are checked against the manifest (a truncated or
    replaced ``lists.ivfdata`` is a one-line error, never a bus error) and mapped read-only; with
    ``mmap=False`` only their layout is read."""
    import faiss

    path = Path(version_dir) / "index.faiss"
    info = manifest.get("on_disk")
    if not info:
        return read_index(path, manifest)
    check_regular(path, "Faiss index")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        raise UniretError(f"{path} is damaged ({_last_line(exc)}); rebuild the index") from None
    check_index_shape(index, path, manifest)
    data = version_file(version_dir, info.get("ivfdata"), "lists file")
    size = data.stat().st_size if data.is_file() else None
    lists = _ivf_lists(_ivf(index))
    if size != info["ivfdata_bytes"] or lists.totsize != size:
        raise UniretError(f"{data} is damaged or missing ({size} bytes, the index expects "
                          f"{info['ivfdata_bytes']}); rebuild the index")
    if mmap and size:  # an index emptied by `index remove` has an empty file: nothing to map
        lists.filename = str(data)  # the lists file always lies beside index.faiss
        lists.read_only = True
        lists.prefetch_nthread = 0  # prefetch threads re-read probed lists: a gain only on cold disks
        lists.do_mmap()
    return index


def load_trained(version_dir: Path, manifest: dict):
    """An empty in-RAM copy of a version's trained index (same quantizer and codes): what ``index
    add`` encodes new items with, and what an in-RAM twin of an on-disk index is built from."""
    import faiss

    index = read_version_index(version_dir, manifest, mmap=False)
    ivf = _ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    empty.this.disown()
    index.ntotal = ivf.ntotal = 0
    return index
