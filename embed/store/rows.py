"""A read-only ``(count, dim)`` array-like over the memory-mapped embeddings of several store parts.

:class:`uniret.embed.store.EmbeddingStore` hands out a :class:`RowsView` as ``.embeddings`` when it
has more than one part, so that callers written for one ``np.memmap`` (``emb[ids]``, ``emb[a:b]``,
``emb[i]``, ``np.asarray(emb, dtype=...)``, ``emb.shape``) keep working on sharded stores.
"""

from __future__ import annotations

import bisect

import numpy as np


class RowsView:
    """The rows of several memory-mapped parts seen as one read-only ``(count, dim)`` array.

    Indexing with an int, a slice, an int array or a bool mask (optionally followed by column
    indices) gathers from the parts and returns an ndarray; ``np.asarray(view)`` concatenates every
    part (fine for small stores; large ones should iterate ``store.parts``).
    """

    def __init__(self, parts: list):
        self.parts = parts
        self._starts = [p.start - parts[0].start for p in parts]
        self.dtype = np.dtype(parts[0].dtype)
        self.shape = (sum(p.count for p in parts), parts[0].dim)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate([np.asarray(p.embeddings) for p in self.parts]) if self.parts else \
            np.zeros(self.shape, self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i %= len(self)
        j = bisect.bisect_right(self._starts, i) - 1
        return np.asarray(self.parts[j].embeddings[i - self._starts[j]])

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        flat = idx.ravel()
        if flat.size and (flat.min() < -len(self) or flat.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        flat = flat % max(len(self), 1)
        out = np.empty((flat.size, self.shape[1]), dtype=self.dtype)
        for start, part in zip(self._starts, self.parts):
            sel = (flat >= start) & (flat < start + part.count)
            if sel.any():
                out[sel] = part.embeddings[flat[sel] - start]
        return out.reshape(idx.shape + (self.shape[1],))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            return rows[key[1:]] if np.ndim(rows) == 1 else rows[(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self._row(int(key))
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                return self._rows(np.arange(a, b, step))
            pieces = [np.asarray(p.embeddings[max(a - s, 0):max(min(b - s, p.count), 0)])
                      for s, p in zip(self._starts, self.parts) if s < b and s + p.count > a]
            return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), self.dtype)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} rows")
            idx = np.flatnonzero(idx)
        return self._rows(idx.astype(np.int64))
