"""The search layer: one :class:`Index` that the CLI, the Python API and the HTTP server search through.

::

    import uniret
    index = uniret.open_index("demo/index", images="demo/data")
    results = index.search(["query.png", "id:3"], k=5, rerank="superglobal", domain="flags")
    results.to_dicts()    # [{"query": "query.png", "results": [{"rank": 1, "id": ..., "score": ...}]}]
    results               # in a notebook: a grid of thumbnails

:func:`open_index` loads the live version of an index directory (its Faiss index, ids, raw vectors
and metadata) once; the index's model copy is loaded on the first image query. ``search`` takes any
mix of queries (see :func:`~uniret.index.queries.prepare_queries`), embeds the images in batches
with the index's own model, searches them together and returns :class:`Results`.
:meth:`Index.refresh` switches to a newer version published by ``uniret index add/remove``; a
search already running keeps the version it started with. Nothing here writes to the index.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UniretError, UsageError
from ..utils import announce_model_load
from .filters import parse_where as check_where
from .ids import UnknownIdError, parse_id, parse_ids
from .images import ImageNotFound, index_images
from .layout import MODEL_DIR, current_version
from .queries import QueryRows, prepare_queries
from .rerank import get_reranker, reranker_names

logger = logging.getLogger("uniret")

# What the HTTP server (serve/) uses of the search layer: it imports this module only.
__all__ = ["MAX_K", "Index", "Results", "QueryResult", "QueryRows", "ImageNotFound", "UnknownIdError",
           "open_index", "parse_id", "parse_ids", "check_k", "check_rerank", "check_shortlist"]

#: The most results one query may ask for (k is also clamped to the index size).
MAX_K = 10_000


@dataclass
class QueryResult:
    """One query's ranked rows (rank, id, score and the item's metadata fields)."""

    query: str
    rows: list[dict]
    image: object = field(default=None, repr=False)  # the decoded query image, for thumbnails
    item: dict | None = None  # the stored item, for an ``id:N`` query


class Results(list):
    """A list of :class:`QueryResult`, one per query, in query order."""

    def __init__(self, queries: list[QueryResult], images=None):
        super().__init__(queries)
        self.images = images  # where result thumbnails come from (or None)

    def to_dicts(self) -> list[dict]:
        return [{"query": q.query, "results": q.rows} for q in self]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dicts(), **kwargs)

    def rows(self) -> list[dict]:
        """Flat rows with a ``query`` column (for tables)."""
        return [{"query": q.query, **row} for q in self for row in q.rows]

    def to_html(self, title: str = "uniret search", fragment: bool = False) -> str:
        from ..pages import render_results

        return render_results(self, title=title, fragment=fragment)

    def _repr_html_(self) -> str:
        return self.to_html(fragment=True)

    def to_pandas(self):
        """The flat rows (:meth:`rows`) as a pandas DataFrame (pandas is optional: ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError:
            raise UniretError("Results.to_pandas() needs pandas: pip install pandas (or use .rows())") from None
        return pd.DataFrame(self.rows())


def check_k(k, count: int) -> int:
    """``k`` as the number of results to fetch: >= 1, at most the index size and :data:`MAX_K`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be an integer >= 1, got {k!r}")
    if k > MAX_K and count > MAX_K:
        logger.warning("k=%d is over the maximum of %d; returning %d results per query", k, MAX_K, MAX_K)
    return int(max(1, min(k, count, MAX_K)))


def check_shortlist(shortlist_dim: int | None, shortlist_k: int | None, dim: int) -> None:
    """The Matryoshka funnel's sizes: a prefix in 1..dim, a shortlist >= 1 and only with a prefix."""
    if shortlist_k is not None and shortlist_dim is None:
        raise UsageError("--shortlist-k needs --shortlist-dim")
    if shortlist_dim is not None and not 0 < shortlist_dim <= dim:
        raise UsageError(f"--shortlist-dim must be in 1..{dim}, got {shortlist_dim}")
    if shortlist_k is not None and shortlist_k < 1:
        raise UsageError(f"--shortlist-k must be >= 1, got {shortlist_k}")


def check_rerank(rerank: str | None) -> str | None:
    """A registered reranker's name, or None for none; a one-line error for any other name."""
    return None if get_reranker(rerank) is None else rerank


class Index:
    """A searchable index directory (see the module docstring)."""

    def __init__(self, path, device: str = "auto", gpu: str = "auto", model=None, images=None,
                 runtime: str = "auto", threads: int | None = None):
        from ..embed.onnx import RUNTIMES
        from .searcher import Searcher

        if str(runtime).strip().lower() not in RUNTIMES:
            raise UsageError(f"runtime {runtime!r}: use torch, onnx or auto")
        self.runtime_request = str(runtime).strip().lower()
        self.threads = threads  # ONNX Runtime threads per forward pass (None: one per core)

        self.root = Path(path)
        self._open_args = {"gpu": gpu, "device": device}
        self.searcher = Searcher.open(self.root, **self._open_args)
        self.model_dir = Path(model) if model is not None else None
        self._images_given = images  # --images overrides the sources the index recorded
        self.images = index_images(self.root, self.searcher.manifest, images)
        self._refresh_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._model = None
        self._image_prep = None
        self._domains: tuple = (None, [])

    # -- what is loaded -------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.searcher.version_dir.name

    @property
    def count(self) -> int:
        return self.searcher.count

    @property
    def dim(self) -> int:
        return self.searcher.dim

    def info(self) -> dict:
        """Model, dims, counts, index kind, search parameters and the recall measured at build."""
        m = self.searcher.manifest
        model = m.get("model") or {}
        return {"index": self.root.resolve().name, "version": self.version, "count": self.count, "dim": self.dim,
                "key": m["key"], "kind": m.get("kind"), "metric": m.get("metric"),
                "search_params": m.get("search_params") or {}, "recall": m.get("recall"),
                "model": {"config_hash": model.get("config_hash"), "backbone": model.get("backbone"),
                          "copy": bool(m.get("model_dir"))},
                "domains": self.domains(), "rerankers": reranker_names(), "max_k": MAX_K,
                "images": self._images_info()}

    def _images_info(self) -> list[str] | None:
        """Where pictures come from, as the index recorded them (relative to it) or "--images": never
        an absolute path of the machine serving it."""
        if self.images is None:
            return None
        if self._images_given is not None:
            return ["--images"]
        return self.images.describe()

    def domains(self) -> list[str]:
        """The domains of the loaded version (computed once per version: the server checks every request)."""
        searcher = self.searcher
        if self._domains[0] is not searcher:
            self._domains = (searcher, sorted({d for d in searcher.row_domains if d is not None}))
        return self._domains[1]

    def item(self, item_id: int) -> dict | None:
        """The stored metadata of one id, or None."""
        return self.searcher.metadata([item_id])[0]

    def image_bytes(self, item_id: int) -> bytes:
        from .ids import UnknownIdError
        from .images import ImageNotFound

        meta = self.item(item_id)
        if meta is None:
            raise UnknownIdError(f"id {item_id} is not in the index")
        if self.images is None:
            raise ImageNotFound("no image source: the index records none (built from a store without a "
                                "source folder, or the folder moved); open it with images=ROOT_OR_LMDB (--images)")
        return self.images.get(meta)

    # -- live updates ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Load the version CURRENT names now, if it is newer; True when it switched."""
        from .searcher import Searcher

        with self._refresh_lock:
            if current_version(self.root).name == self.version:
                return False
            fresh = Searcher.open(self.root, **self._open_args)
            old_images = self.searcher.manifest.get("images")
            if fresh.model_hash != self.searcher.model_hash:
                self._model, self._image_prep = None, None  # rebuilt from another model: load its copy again
            fresh.row_domains  # noqa: B018 - read the domains before the swap, not on a request
            self.searcher = fresh  # one reference swap: searches in flight keep the old version
            if self._images_given is None and fresh.manifest.get("images") != old_images:
                self.images = index_images(self.root, fresh.manifest)  # `index add` brought another folder
            logger.info("index %s: now serving %s (%d items)", self.root, fresh.version_dir.name, fresh.count)
            return True

    # -- writing (a new version, then this object switches to it) --------------------------------
    def add(self, source, model=None, metadata=None, **options) -> dict:
        """Add images (a folder, collection, packed store, shards), a store, or an ``(n, d)`` array
        with ``metadata`` rows; returns the counts and the new ``ids``."""
        from .create import add_to

        res = add_to(self.root, source, model=model if model is not None else self.model_dir, metadata=metadata,
                     **options)
        self.refresh()
        return res

    def remove(self, ids) -> dict:
        """Remove ids (unknown ones are counted, not an error); returns the counts."""
        from .build import remove_from_index

        res = remove_from_index(self.root, ids)
        self.refresh()
        return res

    # -- embedding ------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where image queries are embedded: the resolved ``device`` (``cpu`` or ``cuda:N``, kept as is)."""
        return self.searcher.device

    def _model_path(self) -> Path:
        if self.model_dir is not None:
            from ..embed.model import resolve_model_dir

            return resolve_model_dir(self.model_dir)
        path = self.root / MODEL_DIR
        if not (path / "config.json").is_file():
            raise UniretError(f"{self.root} holds no model copy (built without --model); pass --model DIR, "
                              "or query with id:N or a .npy of embeddings")
        return path

    def load_model(self):
        """The query embedder, loaded and checked against the index once (the one owner of the model):
        the index's model copy (or ``model=``) on :attr:`device`, run by :attr:`runtime` (a torch
        ``UniversalEmbedder`` or an ONNX Runtime ``OnnxEmbedder``; both ``encode`` the same way)."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self._load_embedder()
        return self._model

    def _load_embedder(self):
        from ..embed.onnx import load_embedder, resolve_runtime

        path = self._model_path()
        runtime = resolve_runtime(self.runtime_request, self.device)  # a bad device: one line, before the next
        announce_model_load(path)
        embedder = load_embedder(path, runtime, self.device, auto=self.runtime_request == "auto",
                                 export_missing=self.runtime_request != "auto", threads=self.threads)
        self.searcher.check_model(embedder.config_hash(), what=str(path))
        logger.debug("index %s: embedding queries with %s on %s", self.root, getattr(embedder, "runtime", "torch"),
                     self.device)
        return embedder

    @property
    def runtime(self) -> str:
        """``torch`` or ``onnx``: what runs the model (loads it)."""
        return getattr(self.load_model(), "runtime", "torch")

    def _prep(self):
        """The numpy preprocessing of the model's config (None: a crop mode only torch's transform does)."""
        if self._image_prep is None:
            from ..embed.imageprep import ImagePrep

            config = self.load_model().config.preprocess
            self._image_prep = (ImagePrep(config) if ImagePrep.supports(config) else False,)
        return self._image_prep[0] or None

    def draft_size(self) -> tuple[int, int] | None:
        """How large a query JPEG must be decoded (Pillow's reduced decode) for the model's input."""
        from ..embed.imageprep import draft_size
        from ..utils import read_json

        if self._model is not None:
            return draft_size(self._model.config.preprocess)
        try:  # the model's config only: the model itself loads when the first image is embedded
            return draft_size(read_json(self._model_path() / "config.json")["preprocess"])
        except (UniretError, OSError, ValueError, KeyError, TypeError):
            return None  # no usable model: the image queries fail later, with the reason

    def preprocess(self, rows: QueryRows) -> None:
        """Resize and crop the image rows now, in the calling thread (the server does this per request):
        the batch then only needs one normalisation of the whole batch and the forward pass."""
        if rows.image_rows:
            rows.inputs.update(zip(rows.image_rows, self._inputs([rows.images[i] for i in rows.image_rows])))

    def _inputs(self, images: list) -> list[np.ndarray]:
        """Per image: (H, W, 3) uint8 pixels ready for the batch normalisation, or (3, H, W) float32
        from torch's transform for a crop mode the numpy path does not reproduce."""
        prep = self._prep()
        if prep is not None:
            return [im if isinstance(im, np.ndarray) else prep.pixels(im) for im in images]
        transform = self.load_model().transforms()[1]
        return [im if isinstance(im, np.ndarray) else transform(im).numpy() for im in images]

    def embed_images(self, images: list, batch_size: int = 64) -> np.ndarray:
        """(n, dim) float32 embeddings of PIL images, or of the inputs :meth:`preprocess` made."""
        model = self.load_model()
        inputs = self._inputs(list(images))
        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        for start in range(0, len(inputs), batch_size):
            part = np.stack(inputs[start:start + batch_size])
            batch = self._prep().normalise(part) if part.dtype == np.uint8 else part
            chunks.append(_forward(model, batch))
        vectors = np.concatenate(chunks)
        if not np.isfinite(vectors).all():
            raise UniretError("the model produced non-finite embeddings for a query image; the model is damaged")
        return vectors

    def embed_rows(self, rows: QueryRows, batch_size: int = 64) -> np.ndarray:
        """The (n, dim) query matrix of prepared rows, embedding the image rows."""
        todo = rows.image_rows
        if todo:
            embedded = self.embed_images([rows.model_input(i) for i in todo], batch_size=batch_size)
            for i, vec in zip(todo, embedded):
                rows.vectors[i] = vec
        return np.stack(rows.vectors).astype(np.float32)

    # -- search ---------------------------------------------------------------------------------
    def prepare(self, queries, labels: dict[int, str] | None = None) -> QueryRows:
        """Query rows of ``queries`` with their images decoded (large JPEGs at a reduced scale) and
        preprocessed, ready to embed: what a server does per request, outside its batch worker.
        ``labels`` renames rows (a server labels uploads by their file names)."""
        rows = prepare_queries(queries, self.searcher, draft=self.draft_size() if _has_images(queries) else None)
        for i, label in (labels or {}).items():
            rows.labels[i] = label
        self.preprocess(rows)
        return rows

    def search(self, queries, k: int = 10, rerank: str | None = None, domain: str | None = None,
               threshold: float | None = None, shortlist_dim: int | None = None,
               shortlist_k: int | None = None, where=None) -> Results:
        """Search any mix of queries; one ranked list per (expanded) query. ``where``: one condition or
        a list (all must hold) on any metadata field, e.g. ``["label == 'cat'", "price < 20"]``
        (:mod:`uniret.index.filters`)."""
        searcher = self.searcher
        check_where(where)  # a bad expression fails before any image is embedded
        rows = prepare_queries(queries, searcher, draft=self.draft_size() if _has_images(queries) else None)
        return self.search_vectors(rows, self.embed_rows(rows), k=k, rerank=rerank, domain=domain,
                                   threshold=threshold, shortlist_dim=shortlist_dim, shortlist_k=shortlist_k,
                                   searcher=searcher, where=where)

    def search_vectors(self, rows: QueryRows, xq: np.ndarray, k: int = 10, rerank: str | None = None,
                       domain: str | None = None, threshold: float | None = None,
                       shortlist_dim: int | None = None, shortlist_k: int | None = None,
                       searcher=None, where=None) -> Results:
        """Search an (n, dim) query matrix whose rows are described by ``rows``."""
        searcher = searcher or self.searcher
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be a similarity in [-1, 1], got {threshold}")
        check_shortlist(shortlist_dim, shortlist_k, searcher.dim)
        k = check_k(k, searcher.count)
        scores, ids = searcher.search(xq, k, rerank=check_rerank(rerank), domain=domain,
                                      shortlist_dim=shortlist_dim, shortlist_k=shortlist_k, where=where)
        meta = searcher.metadata(ids)
        query_items = searcher.metadata([-1 if i is None else i for i in rows.ids])
        out = []
        for qi, label in enumerate(rows.labels):
            hits = []
            for rank in range(ids.shape[1]):
                score = float(scores[qi, rank])
                if ids[qi, rank] < 0 or (threshold is not None and score < threshold):
                    continue
                m = meta[qi * ids.shape[1] + rank] or {}
                hits.append({"rank": rank + 1, "id": int(ids[qi, rank]), "score": score, **m})
            out.append(QueryResult(label, hits, image=rows.images[qi], item=query_items[qi]))
        return Results(out, images=self.images)


def _forward(model, batch: np.ndarray) -> np.ndarray:
    """One (N, 3, H, W) float32 batch through either runtime's model -> (N, dim) float32 numpy."""
    if getattr(model, "runtime", "torch") == "onnx":
        return model.run(batch)
    import torch

    return model.encode(torch.from_numpy(batch), batch_size=len(batch)).float().cpu().numpy()


def _has_images(queries) -> bool:
    """Whether any query may be an image (so the model's decode size is worth knowing)."""
    items = queries if isinstance(queries, (list, tuple)) else [queries]
    return any(isinstance(q, (bytes, bytearray, memoryview))
               or (isinstance(q, (str, Path)) and not str(q).startswith("id:") and not str(q).endswith(".npy"))
               for q in items)


def open_index(path, device: str = "auto", gpu: str = "auto", model=None, images=None,
               runtime: str = "auto", threads: int | None = None) -> Index:
    """Open an index directory for searching (see :class:`Index`).

    ``device``: auto | cpu | cuda[:i], where image queries are embedded (and flat indexes searched
    when Faiss has no GPU); ``gpu``: auto | on | off for Faiss; ``model``: a model directory to use
    instead of the index's copy; ``images``: a packed store or folder for result thumbnails;
    ``runtime``: torch | onnx | auto, what runs the model (auto: ONNX Runtime when the model copy
    keeps an exported graph and ONNX Runtime is installed; see :func:`uniret.embed.onnx.resolve_runtime`);
    ``threads``: ONNX Runtime's threads per forward pass (None: one per core; a server running
    several forward passes at once gives each fewer).
    """
    return Index(path, device=device, gpu=gpu, model=model, images=images, runtime=runtime, threads=threads)
