"""UnED evaluation protocols on embeddings already computed: search, optional rerank, metrics.

``merged`` (the standard): one index holds the index sets of all domains and every query searches it.
``separate``: each domain's queries search only that domain's index items. When queries are also in
the index (query split = index split), k + 1 results are retrieved and each query's own id is dropped
(METHOD.md §2), before any reranking. :func:`evaluate_embeddings` is what training's validation calls;
:func:`uniret.eval.run.evaluate` drives it from a model directory and a collection. Exact search and
the rerankers come from :mod:`uniret.index`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UniretError
from ..index.exact import exact_search
from ..index.rerank import candidate_depth
from ..index.rerank import rerank as apply_rerank
from .metrics import retrieval_metrics

PROTOCOLS = ("merged", "separate")


def label_of(item) -> tuple:
    """``(domain, class_ids)`` of an :class:`~uniret.data.Item` or of a label tuple."""
    if isinstance(item, tuple) and len(item) == 2:
        return item
    return item.domain, tuple(item.class_ids)


def self_match_ids(query_items: Sequence, index_items: Sequence) -> np.ndarray:
    """Each query's id in the index, -1 when absent; matched on (domain, split, position).

    Plain label tuples carry no address: the query set must then be the index set, in order.
    """
    if query_items and isinstance(query_items[0], tuple):
        if len(query_items) != len(index_items):
            raise ValueError("self_match with label tuples needs the query set to be the index set")
        return np.arange(len(query_items), dtype=np.int64)
    where = {(it.domain, it.split, it.position): i for i, it in enumerate(index_items)}
    return np.array([where.get((it.domain, it.split, it.position), -1) for it in query_items], dtype=np.int64)


def rerank_results(name: str | None, xq: np.ndarray, xb: np.ndarray, scores: np.ndarray, ids: np.ndarray):
    """Apply a registered reranker (:data:`uniret.index.rerank.RERANKERS`) to the candidates."""
    out_scores, out_ids = apply_rerank(name, xq, xb, ids, scores)
    return np.asarray(out_scores, dtype=np.float32), np.asarray(out_ids, dtype=np.int64)


def drop_self_results(scores: np.ndarray, ids: np.ndarray, query_ids: np.ndarray):
    """Remove each query's own id from its results (wherever it ranks); pad with -inf / -1."""
    keep = (ids != query_ids[:, None]) | (query_ids[:, None] < 0)
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    gone = ~np.take_along_axis(keep, order, axis=1)
    ids[gone], scores[gone] = -1, -np.inf
    return scores, ids


def search_and_rank(xq, xb, k: int, rerank: str | None = None, device: str | None = None,
                    query_ids: np.ndarray | None = None, search_fn=None):
    """Top-k, with each query's own id (``query_ids``, -1 = none) dropped BEFORE reranking, so that
    a query never expands itself; a reranker sees a deeper candidate list than k. ``search_fn(xq, k)
    -> (scores, ids)`` replaces exact search (e.g. an approximate index over ``xb``)."""
    depth = candidate_depth(rerank, k)
    extra = 1 if query_ids is not None and (query_ids >= 0).any() else 0
    if search_fn is None:
        scores, ids = exact_search(xq, xb, depth + extra, device=device)
    else:
        scores, ids = search_fn(xq, depth + extra)
        scores, ids = np.array(scores, dtype=np.float32), np.array(ids, dtype=np.int64)
    if extra:
        scores, ids = drop_self_results(scores, ids, query_ids)
    scores, ids = rerank_results(rerank, xq, xb, scores[:, :depth], ids[:, :depth])
    return scores[:, :k], ids[:, :k]


def evaluate_embeddings(
    query_vectors: np.ndarray,
    query_items: Sequence,
    index_vectors: np.ndarray,
    index_items: Sequence,
    self_match: bool,
    k: int = 100,
    protocol: str = "merged",
    rerank: str | None = None,
    device: str | None = None,
    k_mp: int = 5,
    search_fn=None,
) -> dict:
    """Search ``query_vectors`` against ``index_vectors`` and compute the UnED metrics.

    Items are :class:`~uniret.data.Item` (or ``(domain, class_ids)`` tuples). ``self_match``: queries
    may also be index items (e.g. merged validation: every val item is a query against all val items);
    their own id is dropped. Returns :func:`retrieval_metrics`'s dict (``mean``, ``per_domain``,
    ``queries``, ``excluded``, ``per_query``) plus ``protocol``, ``k``, ``rerank`` and the ranked
    ``scores`` / ``ids`` (nq, k) (index row numbers, best first, self match already dropped).
    ``search_fn(xq, k) -> (scores, ids)``: search an index over ``index_vectors`` instead of exact
    search (merged protocol only).
    """
    if protocol not in PROTOCOLS:
        raise UniretError(f"unknown protocol {protocol!r}; choose merged or separate")
    xq = np.ascontiguousarray(query_vectors, dtype=np.float32)
    xb = np.ascontiguousarray(index_vectors, dtype=np.float32)
    if len(xq) != len(query_items) or len(xb) != len(index_items):
        raise ValueError("vectors and items differ in length")
    query_ids = self_match_ids(query_items, index_items) if self_match else None
    if protocol == "merged":
        scores, ids = search_and_rank(xq, xb, k, rerank=rerank, device=device, query_ids=query_ids,
                                      search_fn=search_fn)
    else:
        if search_fn is not None:
            raise UniretError("an index kind other than flat is evaluated on the merged protocol only")
        scores = np.full((len(xq), k), -np.inf, dtype=np.float32)
        ids = np.full((len(xq), k), -1, dtype=np.int64)
        q_dom = np.array([label_of(it)[0] for it in query_items], dtype=object)
        x_dom = np.array([label_of(it)[0] for it in index_items], dtype=object)
        for d in dict.fromkeys(q_dom.tolist()):
            q_rows = np.flatnonzero(q_dom == d)
            x_rows = np.flatnonzero(x_dom == d)
            if len(x_rows) == 0:
                continue
            local_self = None
            if query_ids is not None:  # global index id -> row within this domain's index
                pos = np.searchsorted(x_rows, query_ids[q_rows])
                pos = np.minimum(pos, len(x_rows) - 1)
                local_self = np.where(x_rows[pos] == query_ids[q_rows], pos, -1)
            s, i = search_and_rank(xq[q_rows], xb[x_rows], k, rerank=rerank, device=device, query_ids=local_self)
            scores[q_rows] = s
            ids[q_rows] = np.where(i >= 0, x_rows[np.maximum(i, 0)], -1)  # back to global ids
    result = retrieval_metrics(
        [label_of(it) for it in query_items],
        [label_of(it) for it in index_items],
        ids,
        query_ids=query_ids,
        k_map=k,
        k_mp=k_mp,
    )
    result.update(protocol=protocol, k=k, rerank=rerank or "none", scores=scores, ids=ids)
    return result

