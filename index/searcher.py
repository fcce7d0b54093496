"""Search an index directory: batched queries, reranking, domain filter, Matryoshka funnel, metadata.

``Searcher.open(INDEX)`` loads the live version. ``search(queries, k)`` returns ``(scores (nq, k)
float32, ids (nq, k) int64)`` with -1 / -inf where fewer than k results exist. Paths:

The search layer's :class:`~uniret.index.api.Index` owns the model and checks every parameter;
this class only searches vectors.

- Flat indexes search exactly: Faiss on the CPU or GPU, or torch on CUDA when Faiss has no GPU;
- IVF indexes search with the tuned nprobe, on the GPU(s) when Faiss has some and k, nprobe <= ``GPU_MAX_K``;
  lossy codes (SQ8, PQ) fetch 4k candidates and rescore them with the raw fp16 vectors;
- on-disk IVF indexes (``index build --on-disk``) search on the CPU with their lists, ids and raw
  vectors memory-mapped; exact paths (domain filter, funnel) stream the raw vectors in blocks;
- ``domain=D`` searches exactly among that domain's vectors (a filtered IVF probe could miss them);
- ``where=`` conditions on any metadata field (:mod:`uniret.index.filters`) search only the rows that
  pass: exactly when they are few, else Faiss with an ``IDSelector``, exactly again where that
  returned fewer than k of them;
- ``shortlist_dim=d`` (Matryoshka funnel) searches the re-normalised d-prefix of the raw vectors for
  ``shortlist_k`` candidates and rescores them with the full vectors;
- ``rerank=`` a name of :data:`uniret.index.rerank.RERANKERS` reranks the top ``rerank_depth``
  candidates (default: the reranker's registered depth) with the raw vectors.

Queries are L2-normalised before searching (the metric is cosine).
"""

from __future__ import annotations

import contextlib
import logging
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import UniretError
from ..safeio import load_npy
from ..utils import resolve_device
from . import gpu as gpu_util
from .exact import REFINE_FACTOR, exact_search, rescore, torch_search
from .filters import FILTER_EXACT_MAX, filtered_faiss_search, select_rows
from .keys import is_lossy, search_param_name, set_search_param
from .layout import MetadataDB, current_version, load_ids_vectors, read_manifest
from .ondisk.lists import read_version_index
from .ondisk.vectors import MappedArray, exact_search_chunked
from .rerank import candidate_depth
from .rerank import rerank as apply_rerank

logger = logging.getLogger("uniret")

#: Searches smaller than this (queries x vectors x dimensions) run Faiss on one thread: an OpenMP team
#: costs more than such a search (4 ms instead of 0.06 ms for one query over 1,000 64-d vectors on a busy
#: 2-core CPU), and a server's parallelism comes from its concurrent requests.
SMALL_SEARCH = 1 << 24


@contextlib.contextmanager
def _faiss_threads(threads: int | None):
    """Faiss's OpenMP thread count for this thread (OpenMP keeps it per thread) inside the block."""
    if threads is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class Searcher:
    """A loaded index version (see the module docstring)."""

    def __init__(self, root: Path, gpu: str = "auto", device: str | None = None):
        self.root = Path(root)
        self.version_dir = current_version(self.root)
        self.manifest = read_manifest(self.version_dir)
        self.index = read_version_index(self.version_dir, self.manifest)
        on_disk = bool(self.manifest.get("on_disk"))
        self.ids, self.vectors = load_ids_vectors(self.version_dir, self.manifest, mmap_ids=on_disk)
        # On-disk indexes: ids and raw vectors stay memory-mapped (never read whole); the exact paths
        # stream the raw vectors block by block through this map.
        self._raw = MappedArray(self.version_dir / "vectors.npy") if on_disk else None
        self.meta = MetadataDB(self.version_dir / "meta")
        self.key = self.manifest["key"]
        self.dim = int(self.manifest["dim"])
        self.search_params = dict(self.manifest.get("search_params") or {})
        set_search_param(self.index, next(iter(self.search_params.values()), None))
        self.use_gpu, self.ngpu = gpu_util.resolve(gpu)
        self.use_gpu = self.use_gpu and self._raw is None  # a GPU clone would read all on-disk lists
        self._device_request = device if gpu != "off" else "cpu"
        self._gpu_index = None

    @classmethod
    def open(cls, index_dir, gpu: str = "auto", device: str | None = None) -> Searcher:
        return cls(Path(index_dir), gpu=gpu, device=device)

    @cached_property
    def device(self) -> str:
        """Where exact search and the model run; resolved on first use, so that opening an index
        (and id or vector queries on a CPU machine) never imports torch."""
        return resolve_device(self._device_request, faiss=True)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def model_hash(self) -> str | None:
        return (self.manifest.get("model") or {}).get("config_hash")

    # -- vectors and metadata ------------------------------------------------------------------
    def rows_of(self, ids) -> np.ndarray:
        """Row numbers of ``ids`` in the raw vectors; -1 for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, ids)
        rows = np.minimum(rows, max(0, len(self.ids) - 1))
        ok = (len(self.ids) > 0) & (self.ids[rows] == ids) if len(self.ids) else np.zeros(ids.shape, bool)
        return np.where(ok, rows, -1)

    def vectors_for(self, ids) -> np.ndarray:
        """(len(ids), dim) float32 raw vectors; zero rows for unknown ids (or -1)."""
        rows = self.rows_of(np.asarray(ids).ravel())
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        ok = rows >= 0
        out[ok] = self.vectors[rows[ok]]
        return out

    def metadata(self, ids) -> list[dict | None]:
        """Metadata dicts (id, path, domain, split, position, class_ids) of ``ids``; None for -1."""
        return self.meta.get(np.asarray(ids).ravel().tolist())

    @cached_property
    def row_domains(self) -> np.ndarray:
        """The domain of every row (object array), read once from the metadata."""
        names = (self.manifest.get("on_disk") or {}).get("domains")
        if names is not None:  # on-disk versions keep a domain code per row: no scan of the metadata
            codes = load_npy(self.version_dir / "domains.npy", kinds="iu", what="domain codes")
            if codes.shape != (len(self.ids),) or (len(codes) and not 0 <= codes.min() <= codes.max() < len(names)):
                raise UniretError(f"{self.version_dir / 'domains.npy'}: does not match the index; rebuild it")
            return np.array(names, dtype=object)[codes]
        return np.array([m["domain"] if m else None for m in self.meta.get(self.ids.tolist())], dtype=object)

    @cached_property
    def _full_vectors(self) -> np.ndarray:
        return np.asarray(self.vectors, dtype=np.float32)

    # -- search ---------------------------------------------------------------------------------
    def _faiss_index_for(self, k: int):
        """The GPU clone when Faiss has GPUs and the query fits its limits, else the CPU index."""
        nprobe = self.search_params.get("nprobe") or 0
        if not (self.use_gpu and gpu_util.gpu_capable(self.key) and k <= gpu_util.GPU_MAX_K
                and nprobe <= gpu_util.GPU_MAX_K):
            return self.index
        if self._gpu_index is None:
            try:
                self._gpu_index = gpu_util.to_gpus(self.index, self.ngpu)
                if nprobe:
                    import faiss

                    faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", int(nprobe))
            except RuntimeError as exc:  # an index Faiss cannot clone to the GPU: stay on the CPU
                logger.warning("index: cannot move %s to the GPU (%s); searching on the CPU", self.key, exc)
                self.use_gpu = False
                return self.index
        return self._gpu_index

    def _exact_rows(self, xq: np.ndarray, rows: np.ndarray | None, k: int, prefix_dim: int | None = None):
        """Exact search over all raw vectors (rows=None) or a subset of rows, optionally of their
        re-normalised ``prefix_dim`` prefixes; returns (scores, ids)."""
        if self._raw is not None:  # on-disk: stream the raw vectors block by block
            scores, hit = exact_search_chunked(xq, self._raw, k, rows=rows, prefix_dim=prefix_dim)
            return scores, np.where(hit >= 0, self.ids[np.maximum(hit, 0)], -1)
        base = self._full_vectors if prefix_dim is None else self.prefix_vectors(prefix_dim)
        sub = base if rows is None else base[rows]
        scores, hit = exact_search(xq, sub, k, device=self.device)
        mapped = hit if rows is None else np.where(hit >= 0, rows[np.maximum(hit, 0)], -1)
        return scores, np.where(mapped >= 0, self.ids[np.maximum(mapped, 0)], -1)

    def _base_search(self, xq: np.ndarray, k: int, domain: str | None, shortlist_dim: int | None,
                     shortlist_k: int | None, where=None):
        rows = None
        if domain is not None:
            rows = np.flatnonzero(self.row_domains == domain)
            if len(rows) == 0:
                known = sorted({d for d in self.row_domains if d is not None})
                raise UniretError(f"--domain {domain!r} has no items in this index; domains: {', '.join(known) or 'none'}")
        if where:
            rows = select_rows(self, where, rows)
            if len(rows) == 0:  # nothing passes: no results, not an error
                return np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
            if shortlist_dim is None and len(rows) > FILTER_EXACT_MAX:
                return filtered_faiss_search(self, xq, k, rows)
        if shortlist_dim is not None:
            return self._funnel(xq, k, rows, shortlist_dim, shortlist_k or max(10 * k, 1000))
        if rows is not None:
            return self._exact_rows(xq, rows, k)
        if search_param_name(self.index) is None and gpu_util.num_gpus() == 0 and self.device.startswith("cuda"):
            # Flat index, CUDA through torch: keep the vectors on the device between calls.
            scores, rows_hit = torch_search(xq, self._device_vectors, k, device=self.device)
            return scores, np.where(rows_hit >= 0, self.ids[np.maximum(rows_hit, 0)], -1)
        if is_lossy(self.key):
            _, cand = self._faiss_index_for(k * REFINE_FACTOR).search(xq, k * REFINE_FACTOR)
            return rescore(xq, cand, self.vectors_for, k)
        scores, ids = self._faiss_index_for(k).search(xq, k)
        scores = scores.astype(np.float32)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64)

    @cached_property
    def _device_vectors(self):
        import torch

        return torch.as_tensor(self._full_vectors).to(self.device)

    def prefix_vectors(self, d: int) -> np.ndarray:
        """The re-normalised d-prefix of every raw vector (cached per d)."""
        cache = self.__dict__.setdefault("_prefix_cache", {})
        if d not in cache:
            pre = self._full_vectors[:, :d].copy()
            pre /= np.maximum(np.linalg.norm(pre, axis=1, keepdims=True), 1e-12)
            cache[d] = pre
        return cache[d]

    def _funnel(self, xq, k, rows, d, shortlist_k):
        nested = (self.manifest.get("model") or {}).get("nested_dims")
        if nested and d not in nested:
            logger.warning("--shortlist-dim %d is not one of the model's nested dims %s", d, nested)
        q_pre = xq[:, :d] / np.maximum(np.linalg.norm(xq[:, :d], axis=1, keepdims=True), 1e-12)
        _, cand = self._exact_rows(q_pre, rows, max(shortlist_k, k), prefix_dim=d)
        return rescore(xq, cand, self.vectors_for, k)

    def search(self, queries, k: int = 10, rerank: str | None = None, domain: str | None = None,
               shortlist_dim: int | None = None, shortlist_k: int | None = None, rerank_depth: int | None = None,
               where=None, **rerank_options) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and scores for a batch of query embeddings (see the module docstring): vectors in,
        ids out; ``where``: metadata conditions (:mod:`uniret.index.filters`). ``k`` (>= 1) and the
        funnel's sizes are the caller's to check (``Index`` does, once)."""
        xq = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if xq.ndim == 1:
            xq = xq[None]
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise UniretError(f"queries have shape {xq.shape}, this index holds {self.dim}-d vectors")
        xq = xq / np.maximum(np.linalg.norm(xq, axis=1, keepdims=True), 1e-12)
        depth = candidate_depth(rerank, k, rerank_depth)
        with _faiss_threads(1 if len(xq) * self.count * self.dim < SMALL_SEARCH else None):
            scores, ids = self._base_search(xq, depth, domain, shortlist_dim, shortlist_k, where)
        scores, ids = apply_rerank(rerank, xq, self.vectors_for, ids, scores, **rerank_options)
        return scores[:, :k], ids[:, :k]

    # -- the model that made the index -----------------------------------------------------------
    def check_model(self, config_hash: str, what: str = "the query model") -> None:
        """Refuse a query model other than the one that embedded the index (the search layer's
        ``Index`` owns and loads the model; this only compares hashes)."""
        if self.model_hash and config_hash != self.model_hash:
            raise UniretError(f"{what} is model {config_hash}, but index {self.root} was built from model "
                              f"{self.model_hash}; query with the model that embedded the index")
