"""Near-duplicate groups in an index: kNN graph above a similarity threshold, connected components.

Every stored vector searches the index for its ``neighbors`` nearest items; pairs with similarity
>= the threshold are joined (union-find), and each group keeps its smallest id (the oldest item).
``fraction=F`` picks the threshold as the (1-F) quantile of nearest-neighbour similarities, so about
a fraction F of the items end up in a group.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

#: The most neighbours examined per item (memory grows with items x neighbours).
MAX_NEIGHBORS = 1000


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of an edge list over 0..n-1 (union-find with path halving)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.array([find(i) for i in range(n)])


def find_duplicates(searcher, threshold: float | None = None, fraction: float | None = None,
                    neighbors: int = 10, batch: int = 4096) -> dict:
    """``{"threshold", "groups": [[id, ...], ...], "keep": [...], "remove": [...]}``; groups sorted by
    their first id, ids inside a group ascending; ``keep`` holds the first id of each group."""
    if threshold is not None and fraction is not None:
        raise UsageError("give --threshold or --fraction, not both")
    if fraction is not None and not 0 < fraction < 1:
        raise UsageError(f"--fraction must be in (0, 1), got {fraction}")
    if threshold is not None and not 0 < threshold <= 1:
        # Similarities are cosines; at <= 0 nearly every item would be "a duplicate" of another.
        raise UsageError(f"--threshold must be a similarity in (0, 1], got {threshold}")
    if isinstance(neighbors, bool) or not 1 <= neighbors <= MAX_NEIGHBORS:
        raise UsageError(f"--neighbors must be in 1..{MAX_NEIGHBORS}, got {neighbors}")
    if threshold is None and fraction is None:
        threshold = 0.95
    n = searcher.count
    if n < 2:
        return {"threshold": threshold, "groups": [], "keep": [], "remove": []}
    k = min(neighbors + 1, n)
    all_scores, all_ids = [], []
    for start in range(0, n, batch):
        q = np.asarray(searcher.vectors[start:start + batch], dtype=np.float32)
        s, i = searcher.search(q, k)
        all_scores.append(s)
        all_ids.append(i)
    scores, ids = np.concatenate(all_scores), np.concatenate(all_ids)
    own = searcher.ids[:, None]
    scores = np.where((ids == own) | (ids < 0), -np.inf, scores)
    if threshold is None:
        threshold = float(np.quantile(scores.max(axis=1), 1 - fraction))
    qi, col = np.nonzero(scores >= threshold)
    rows_b = searcher.rows_of(ids[qi, col])
    keep_edge = rows_b >= 0
    roots = _components(n, qi[keep_edge], rows_b[keep_edge])
    groups: dict[int, list[int]] = {}
    for row, root in enumerate(roots.tolist()):
        groups.setdefault(root, []).append(int(searcher.ids[row]))
    out = sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    return {"threshold": float(threshold), "groups": out, "keep": [g[0] for g in out],
            "remove": [i for g in out for i in g[1:]]}
