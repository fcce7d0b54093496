"""UnED retrieval metrics (METHOD.md §2) as batched numpy functions.

Relevance: an index item is relevant to a query when both have the same domain AND share at least
one class id (multi-label items allowed). When a query is itself in the index, its own id is removed
from its ranking (by id, wherever it appears) and from n_q. Queries with n_q = 0 are excluded from
every mean and counted. Per-domain values are means over that domain's queries; the overall value is
the UNWEIGHTED mean over domains.

- mMP@k:  MP@k(q) = (1/min(n_q,k)) * sum_{j<=min(n_q,k)} rel_q(j)
- mAP@k:  AP@k(q) = (1/min(n_q,k)) * sum_{j<=k} P@j(q) * rel_q(j)
- R@1:    rel_q(1)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Label = tuple  # (domain, class_ids): class_ids an int or a sequence of ints


def metric_names(k_map: int = 100, k_mp: int = 5) -> tuple[str, str, str]:
    """The keys used in results, e.g. ("mMP@5", "mAP@100", "R@1")."""
    return f"mMP@{k_mp}", f"mAP@{k_map}", "R@1"


def encode_labels(query_labels: Sequence[Label], index_labels: Sequence[Label]):
    """Map every (domain, class) identity to an int; return padded (n, L) int64 arrays.

    Padding is -1 for queries and -2 for index items so that padding never matches padding.
    Also returns the query domains as ints and the domain names.
    """
    identity: dict[tuple, int] = {}
    domains: dict = {}

    def encode(labels, pad):
        rows = []
        for domain, cids in labels:
            cids = (cids,) if isinstance(cids, (int, np.integer)) else tuple(cids)
            rows.append([identity.setdefault((domain, int(c)), len(identity)) for c in cids])
        width = max((len(r) for r in rows), default=1) or 1
        out = np.full((len(rows), width), pad, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    q = encode(query_labels, -1)
    x = encode(index_labels, -2)
    q_domain = np.array([domains.setdefault(d, len(domains)) for d, _ in query_labels], dtype=np.int64)
    return q, x, q_domain, list(domains)


def relevance(query_codes: np.ndarray, index_codes: np.ndarray, ranked_ids: np.ndarray) -> np.ndarray:
    """(nq, k) bool: does the item at each rank share an identity with the query? -1 ids are not."""
    valid = ranked_ids >= 0
    got = index_codes[np.where(valid, ranked_ids, 0)]  # (nq, k, Li)
    rel = (got[:, :, :, None] == query_codes[:, None, None, :]).any(axis=(2, 3))
    return rel & valid


def count_relevant(query_codes: np.ndarray, index_codes: np.ndarray) -> np.ndarray:
    """n_q before removing the query itself: the number of index items sharing an identity with q."""
    n_ident = int(max(query_codes.max(initial=-1), index_codes.max(initial=-1))) + 1
    if query_codes.shape[1] == 1 and index_codes.shape[1] == 1:
        # Single-label fast path: n_q is the size of q's class in the index.
        sizes = np.bincount(index_codes[:, 0][index_codes[:, 0] >= 0], minlength=n_ident)
        return sizes[query_codes[:, 0]]
    # Multi-label: join (query, identity) with (identity, item) pairs, count distinct items per query.
    x_item, x_slot = np.nonzero(index_codes >= 0)
    x_ident = index_codes[x_item, x_slot]
    order = np.argsort(x_ident, kind="stable")
    x_ident, x_item = x_ident[order], x_item[order]
    q_row, q_slot = np.nonzero(query_codes >= 0)
    q_ident = query_codes[q_row, q_slot]
    start = np.searchsorted(x_ident, q_ident, side="left")
    stop = np.searchsorted(x_ident, q_ident, side="right")
    lengths = stop - start
    pair_query = np.repeat(q_row, lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pair_item = x_item[np.repeat(start, lengths) + offsets]
    keys = np.unique(pair_query * len(index_codes) + pair_item)
    return np.bincount(keys // max(len(index_codes), 1), minlength=len(query_codes))


def drop_self(ranked_ids: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Remove each query's own id from its row (wherever it is), shift the rest left, pad with -1."""
    ranked_ids = np.asarray(ranked_ids, dtype=np.int64)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    keep = (ranked_ids != query_ids[:, None]) | (query_ids[:, None] < 0)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept columns first, in their order
    out = np.take_along_axis(ranked_ids, order, axis=1)
    out[~np.take_along_axis(keep, order, axis=1)] = -1
    return out


def per_query_metrics(rel: np.ndarray, n_q: np.ndarray, k_map: int = 100, k_mp: int = 5) -> dict:
    """MP@k_mp, AP@k_map and R@1 per query from the (nq, >=k) relevance matrix; NaN where n_q = 0."""
    nq = len(rel)
    rel = np.asarray(rel, dtype=bool)
    width = max(k_map, k_mp, 1)
    if rel.shape[1] < width:  # fewer results than k: the missing ranks are not relevant
        rel = np.concatenate([rel, np.zeros((nq, width - rel.shape[1]), dtype=bool)], axis=1)
    rel = rel.astype(np.float64)
    n_q = np.asarray(n_q, dtype=np.int64)
    valid = n_q > 0
    ranks = np.arange(1, width + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m_mp = np.minimum(n_q, k_mp)
        mp = (rel[:, :k_mp] * (ranks[None, :k_mp] <= m_mp[:, None])).sum(1) / m_mp
        hits = np.cumsum(rel[:, :k_map], axis=1)
        ap = (hits / ranks[None, :k_map] * rel[:, :k_map]).sum(1) / np.minimum(n_q, k_map)
    r1 = rel[:, 0] if width else np.zeros(nq)
    nan = np.full(nq, np.nan)
    mp_name, ap_name, r1_name = metric_names(k_map, k_mp)
    return {
        mp_name: np.where(valid, mp, nan),
        ap_name: np.where(valid, ap, nan),
        r1_name: np.where(valid, r1, nan),
        "n_q": n_q,
        "valid": valid,
    }


def summarize(per_query: dict, query_domain: np.ndarray, domain_names: Sequence, names: Sequence[str]) -> dict:
    """Per-domain means over valid queries, and the unweighted mean over domains that have any."""
    valid = per_query["valid"]
    per_domain = {}
    for d, name in enumerate(domain_names):
        mine = query_domain == d
        ok = mine & valid
        row = {m: (float(per_query[m][ok].mean()) if ok.any() else None) for m in names}
        row.update(queries=int(mine.sum()), evaluated=int(ok.sum()), excluded=int((mine & ~valid).sum()))
        per_domain[str(name)] = row
    scored = [r for r in per_domain.values() if r["evaluated"]]
    mean = {m: (float(np.mean([r[m] for r in scored])) if scored else None) for m in names}
    return {
        "mean": mean,
        "per_domain": per_domain,
        "queries": int(len(valid)),
        "evaluated": int(valid.sum()),
        "excluded": int((~valid).sum()),
    }


def retrieval_metrics(
    query_labels: Sequence[Label],
    index_labels: Sequence[Label],
    ranked_ids: np.ndarray,
    query_ids: np.ndarray | None = None,
    k_map: int = 100,
    k_mp: int = 5,
) -> dict:
    """All UnED metrics of one ranking.

    ``query_labels`` / ``index_labels``: ``(domain, class_ids)`` per item. ``ranked_ids``: (nq, k')
    index ids best first, -1 for no result. ``query_ids``: each query's own id in the index, or -1
    when it is not there (None: no query is in the index).

    Returns ``{"mean", "per_domain", "queries", "evaluated", "excluded", "per_query"}``; per-query
    arrays hold NaN for excluded queries.
    """
    ranked_ids = np.asarray(ranked_ids, dtype=np.int64).reshape(len(query_labels), -1)
    q_codes, x_codes, q_domain, domain_names = encode_labels(query_labels, index_labels)
    n_q = count_relevant(q_codes, x_codes) if len(query_labels) else np.zeros(0, dtype=np.int64)
    if query_ids is not None:
        query_ids = np.asarray(query_ids, dtype=np.int64)
        if query_ids.shape != (len(query_labels),):
            raise ValueError(f"query_ids has shape {query_ids.shape}, expected ({len(query_labels)},)")
        ranked_ids = drop_self(ranked_ids, query_ids)
        inside = query_ids >= 0
        # The query counts itself in n_q only if its index row shares an identity with it.
        self_rel = np.zeros(len(query_ids), dtype=bool)
        if inside.any():
            self_rel[inside] = relevance(q_codes[inside], x_codes, query_ids[inside, None])[:, 0]
        n_q = n_q - self_rel
    rel = relevance(q_codes, x_codes, ranked_ids)
    names = metric_names(k_map, k_mp)
    per_query = per_query_metrics(rel, n_q, k_map=k_map, k_mp=k_mp)
    out = summarize(per_query, q_domain, domain_names, names)
    out["per_query"] = {**per_query, "ranked_ids": ranked_ids, "relevant": rel}
    return out
