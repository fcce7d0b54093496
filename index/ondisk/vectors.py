"""The raw fp16 vectors kept beside an on-disk index (``vectors.npy``), written and read without ever
holding them whole.

:class:`ArrayWriter` streams rows into a ``.npy`` file with plain writes (also ids and domain
codes). :class:`MappedArray` memory-maps one for reading (rescoring, reranking, exact search). Pages a search maps in stay in its
RSS (file-backed and clean: the kernel reclaims them under memory pressure; each random row read maps
its neighbourhood too, so handing them back per search would cost more than the search). Scans over
the whole file (:meth:`MappedArray.blocks`, used by the build and by exact search) hand each block's
pages back (:meth:`MappedArray.release`), so they never hold the file in RSS.
:func:`exact_search_chunked` is exact top-k over such a file, block by block, merged with Faiss's
result heap.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ...errors import UniretError


def sync_and_evict(f) -> None:
    """fsync an open file, then drop its pages from the page cache: a build writing gigabytes does
    not push everything else out of the cache, and a later search maps in only what it reads
    (freshly written pages sit in large folios that a fault maps in whole)."""
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class ArrayWriter:
    """Write a ``.npy`` file of ``shape`` (length known up front) a block of rows at a time, with
    plain writes: raw vectors (n, dim) float16, ids (n,) int64, domain codes (n,) int32."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype=np.float16):
        self.path, self.shape, self.dtype, self.written = Path(path), tuple(int(s) for s in shape), np.dtype(dtype), 0
        self.f = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.f, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.written + len(rows) > self.shape[0]:
            raise ValueError(f"rows of shape {rows.shape} do not fit {self.path} ({self.written}/{self.shape} written)")
        self.f.write(rows.tobytes())
        self.written += len(rows)

    def copy_from(self, other: MappedArray, keep: np.ndarray | None = None, step: int = 1 << 18) -> None:
        """Append ``other``'s rows (those where ``keep`` is True), streamed in blocks."""
        for start, block in other.blocks(step, dtype=self.dtype):
            self.write(block if keep is None else block[keep[start:start + len(block)]])

    def close(self) -> None:
        if self.written != self.shape[0]:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.shape[0]} declared")
        sync_and_evict(self.f)
        self.f.close()


class MappedArray:
    """Read-only view of a 1-D or 2-D ``.npy`` file through a memory map (``.array``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            if self.path.is_symlink() or not self.path.is_file():
                raise ValueError("missing, a link or not a regular file")
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if dtype.hasobject:
                    raise ValueError("it holds Python objects (a pickle); uniret never unpickles")
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
                if len(shape) not in (1, 2) or fortran or size != offset + int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError(f"shape {shape}, {size} bytes")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise UniretError(f"{self.path}: damaged or truncated array file ({exc}); rebuild the index") from None
        self.array = np.frombuffer(self._mm, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    def release(self) -> None:
        """Drop this process's mapped pages (they stay in the page cache; the next read refaults)."""
        self._mm.madvise(mmap.MADV_DONTNEED)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies of ``rows`` (sorted first for locality); zero vectors for rows < 0."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        ok = np.flatnonzero(rows >= 0)
        order = ok[np.argsort(rows[ok], kind="stable")]
        out[order] = self.array[rows[order]]
        return out

    def blocks(self, step: int, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows[start:start+step] as ``dtype``) for the whole file, releasing pages behind."""
        for start in range(0, len(self), step):
            block = np.array(self.array[start:start + step], dtype=dtype)
            self.release()
            yield start, block


def exact_search_chunked(xq: np.ndarray, vectors: MappedArray, k: int, rows: np.ndarray | None = None,
                         prefix_dim: int | None = None, step: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``xq`` over ``vectors`` (all rows, or only ``rows``), one block
    at a time. ``prefix_dim`` searches the re-normalised prefixes (Matryoshka funnel). Returns
    (scores, row numbers), -inf / -1 where fewer than k rows exist."""
    import faiss

    k_eff = min(k, len(vectors) if rows is None else len(rows))
    heap = faiss.ResultHeap(len(xq), max(k_eff, 1), keep_max=True)
    mask = None
    if rows is not None:
        mask = np.zeros(len(vectors), dtype=bool)
        mask[rows] = True
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    for start, block in vectors.blocks(step):
        chosen = np.arange(start, start + len(block)) if mask is None else start + np.flatnonzero(mask[start:start + len(block)])
        xb = block if mask is None else block[chosen - start]
        if prefix_dim is not None:
            xb = xb[:, :prefix_dim]
            xb = xb / np.maximum(np.linalg.norm(xb, axis=1, keepdims=True), 1e-12)
        if len(xb) == 0 or k_eff == 0:
            continue
        scores, hit = faiss.knn(xq, np.ascontiguousarray(xb), min(k_eff, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(hit >= 0, chosen[np.maximum(hit, 0)], -1))
    heap.finalize()
    out_s = np.full((len(xq), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(xq), k), -1, dtype=np.int64)
    if k_eff:
        out_s[:, :k_eff], out_i[:, :k_eff] = heap.D, heap.I
    out_s[out_i < 0] = -np.inf
    return out_s, out_i
