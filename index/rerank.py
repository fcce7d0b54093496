"""Global-feature reranking of a retrieved shortlist (SuperGlobal, average QE, alpha-QE) and the
registry of rerankers (:data:`RERANKERS`: name -> function and default candidate depth).

All three take the query vectors ``xq`` (nq, d), the database vectors ``xb`` (an array, a tensor or
a callable that gathers rows by id: ``xb(ids: np.ndarray) -> (len(ids), d)``), the candidate ``ids``
(nq, c) int64 (-1 = no candidate) and their ``scores`` (nq, c), and return reranked ``(scores, ids)``
of the same shape. Only the first ``M`` candidates are rescored and re-sorted; the rest keep their
order and scores behind them. Work is batched over queries with tensor ops (no Python loop per
query), on CUDA when available. Vectors are expected L2-normalised (METHOD.md §4).

SuperGlobal, as uniret implements it (METHOD.md §4):
1. ``d' = normalize(d + beta * sum_{c in kNN_K(d)} sim(d, c) * c)`` where ``kNN_K(d)`` are the K most
   similar OTHER candidates among the top M (d itself is excluded: it is already the first term),
   and ``s1 = q . d'``;
2. ``q' = normalize(max over the top-(K+1) refined candidates by s1)`` (element-wise), ``s2 = q' . d'``;
3. final score ``(s1 + s2) / 2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _device(xq, device):
    import torch

    if device is not None:
        return torch.device(device)
    if isinstance(xq, torch.Tensor):
        return xq.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gather(xb, ids, dev):
    """Rows of ``xb`` for ``ids`` (any shape, -1 allowed) as float32 on ``dev``; -1 gives a zero row."""
    import torch

    ids_t = torch.as_tensor(ids)
    flat = ids_t.reshape(-1)
    valid = flat >= 0
    safe = torch.where(valid, flat, torch.zeros_like(flat))
    if callable(xb) and not isinstance(xb, (np.ndarray, torch.Tensor)):
        rows = torch.as_tensor(np.asarray(xb(safe.cpu().numpy())))
    elif isinstance(xb, torch.Tensor):
        rows = xb[safe.to(xb.device)]
    else:
        rows = torch.as_tensor(np.asarray(xb[safe.cpu().numpy()]))
    rows = rows.to(dev, torch.float32) * valid.to(dev).unsqueeze(1)
    return rows.reshape(*ids_t.shape, rows.shape[-1])


def _to_outputs(scores, ids, like):
    import torch

    if isinstance(like, torch.Tensor):
        return scores, ids
    return scores.cpu().numpy().astype(np.float32), ids.cpu().numpy().astype(np.int64)


def _rerank_batched(xq, xb, ids, scores, M: int, batch_size: int, device, score_fn):
    """Shared driver: rescore the first M candidates of each query with ``score_fn(q, D, valid)``."""
    import torch

    dev = _device(xq, device)
    ids_t = torch.as_tensor(ids).to(torch.int64)
    scores_t = torch.as_tensor(scores).to(torch.float32)
    if ids_t.shape != scores_t.shape or ids_t.ndim != 2:
        raise ValueError(f"ids {tuple(ids_t.shape)} and scores {tuple(scores_t.shape)} must be the same (nq, c)")
    xq_t = torch.as_tensor(xq).to(torch.float32)
    nq, c = ids_t.shape
    m = min(M, c)
    out_s, out_i = scores_t.clone(), ids_t.clone()
    if m == 0:
        return _to_outputs(out_s, out_i, ids)
    for start in range(0, nq, batch_size):
        sl = slice(start, start + batch_size)
        cand = ids_t[sl, :m].to(dev)
        valid = cand >= 0
        D = _gather(xb, cand, dev)  # (b, m, d)
        q = xq_t[sl].to(dev)
        new = score_fn(q, D, valid)
        new = torch.where(valid, new, torch.full_like(new, -torch.inf))
        new_s, order = torch.sort(new, dim=1, descending=True, stable=True)
        out_s[sl, :m] = new_s.to(out_s.device)
        out_i[sl, :m] = torch.gather(cand, 1, order).to(out_i.device)
    return _to_outputs(out_s, out_i, ids)


def _normalize(x):
    import torch

    return torch.nn.functional.normalize(x, dim=-1)


def superglobal(xq, xb, ids, scores, M: int = 400, K: int = 9, beta: float = 0.15,
                batch_size: int = 256, device=None):
    """SuperGlobal reranking (see the module docstring) of the top ``M`` candidates."""
    import torch

    def score_fn(q, D, valid):
        b, m, _ = D.shape
        S = D @ D.transpose(1, 2)  # (b, m, m) candidate-candidate similarities
        bad = ~(valid.unsqueeze(1) & valid.unsqueeze(2)) | torch.eye(m, dtype=torch.bool, device=D.device)
        S = S.masked_fill(bad, -torch.inf)
        kk = min(K, m - 1)
        W = torch.zeros_like(S)
        if kk > 0:
            vals, nbr = torch.topk(S, kk, dim=2)
            weights = torch.where(torch.isfinite(vals), beta * vals, torch.zeros_like(vals))
            W.scatter_(2, nbr, weights)
        D_ref = _normalize(D + W @ D) * valid.unsqueeze(2)
        s1 = torch.einsum("bmd,bd->bm", D_ref, q)
        s1_masked = s1.masked_fill(~valid, -torch.inf)
        top = torch.topk(s1_masked, min(K + 1, m), dim=1).indices  # (b, K+1)
        top_valid = torch.gather(valid, 1, top)
        top_vecs = torch.gather(D_ref, 1, top.unsqueeze(2).expand(-1, -1, D_ref.shape[2]))
        top_vecs = top_vecs.masked_fill(~top_valid.unsqueeze(2), -torch.inf)
        q_exp = top_vecs.max(dim=1).values
        q_exp = torch.where(torch.isfinite(q_exp), q_exp, q)  # a query without candidates keeps q
        s2 = torch.einsum("bmd,bd->bm", D_ref, _normalize(q_exp))
        return (s1 + s2) / 2

    return _rerank_batched(xq, xb, ids, scores, M, batch_size, device, score_fn)


def _expanded_query_scores(q, D, valid, k: int, alpha: float | None):
    import torch

    top = D[:, :k]
    sims = torch.einsum("bkd,bd->bk", top, q)
    if alpha is None:
        weights = valid[:, :k].float()
    else:
        weights = sims.clamp(min=0).pow(alpha) * valid[:, :k]
    q_new = _normalize(q + torch.einsum("bk,bkd->bd", weights, top))
    return torch.einsum("bmd,bd->bm", D, q_new)


def aqe(xq, xb, ids, scores, k: int = 10, M: int | None = None, batch_size: int = 1024, device=None):
    """Average query expansion: ``q' = normalize(q + sum of the top-k candidates)``; rescore the top M
    (all given candidates by default) with ``q'``."""
    M = np.asarray(ids).shape[1] if M is None else M
    return _rerank_batched(xq, xb, ids, scores, M, batch_size, device,
                           lambda q, D, v: _expanded_query_scores(q, D, v, k, None))


def alpha_qe(xq, xb, ids, scores, k: int = 10, alpha: float = 3.0, M: int | None = None,
             batch_size: int = 1024, device=None):
    """alpha-QE: ``q' = normalize(q + sum_i max(q . d_i, 0)^alpha d_i)`` over the top-k candidates."""
    M = np.asarray(ids).shape[1] if M is None else M
    return _rerank_batched(xq, xb, ids, scores, M, batch_size, device,
                           lambda q, D, v: _expanded_query_scores(q, D, v, k, alpha))


@dataclass(frozen=True)
class Reranker:
    """A registered reranker: ``fn(xq, xb, ids, scores, **options) -> (scores, ids)`` (the contract
    in the module docstring) and ``depth``, the candidates a search fetches for it by default (the
    ``M`` it rescores)."""

    fn: Callable
    depth: int
    summary: str


#: The one list of rerankers: every caller (Searcher, eval, the CLI choices, serve) reads it. Adding a
#: reranker is a function above plus one entry here (and its tests).
RERANKERS: dict[str, Reranker] = {
    "superglobal": Reranker(superglobal, 400, "SuperGlobal: refine the top 400 with their neighbours, expand the query"),
    "aqe": Reranker(aqe, 100, "average query expansion over the top 10, rescoring the top 100"),
    "alpha-qe": Reranker(alpha_qe, 100, "alpha-weighted query expansion over the top 10, rescoring the top 100"),
}
NONE = "none"


def reranker_names() -> list[str]:
    """``none`` and every registered reranker, in registry order (the CLI's choices)."""
    return [NONE, *RERANKERS]


def get_reranker(name: str | None) -> Reranker | None:
    """The registered reranker ``name``; None for ``none``/None; a one-line error for anything else."""
    if name in (None, NONE):
        return None
    if name not in RERANKERS:
        from ..errors import UsageError

        raise UsageError(f"unknown reranker {name!r}; use one of {', '.join(reranker_names())}")
    return RERANKERS[name]


def candidate_depth(name: str | None, k: int, depth: int | None = None) -> int:
    """How many candidates to fetch for ``k`` results reranked by ``name``: at least k, and the
    reranker's registered depth unless ``depth`` overrides it."""
    reranker = get_reranker(name)
    if reranker is None:
        return k
    return max(k, depth or reranker.depth)


def rerank(name: str | None, xq, xb, ids, scores, **kwargs):
    """Rerank by registered name (``none``/None returns the input unchanged)."""
    reranker = get_reranker(name)
    if reranker is None:
        return scores, ids
    return reranker.fn(xq, xb, ids, scores, **kwargs)
