"""Exact inner-product top-k search on whatever hardware is there.

:func:`exact_search` is the one call eval, training's validation and the index use for brute-force
search. Backends, picked by ``device``:

- faiss GPU (``faiss.get_num_gpus() > 0``): ``faiss.knn_gpu`` on the first GPU, k <= ``GPU_MAX_K`` (2048);
- torch on CUDA (faiss without GPU, torch sees a device): chunked matmul + ``topk``. The matmul runs
  in fp16 to use the tensor cores; a shortlist of ``2k + 16`` candidates per query is then rescored in
  fp32, so scores are fp32-exact and only near-ties at the shortlist border could differ;
- faiss CPU (``IndexFlatIP``) otherwise, and for k > ``GPU_MAX_K`` (the GPU k-selection limit).

Results where the database has fewer than k rows are padded with id -1 and score -inf.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from ..utils import resolve_device
from .gpu import GPU_MAX_K

logger = logging.getLogger("uniret")

#: Lossy (SQ/PQ) indexes fetch this many times k candidates, then rescore them with the raw vectors.
REFINE_FACTOR = 4


def _as_float32(x) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (nq, k') results to k columns with -inf / -1."""
    nq, kk = ids.shape
    if kk == k:
        return scores, ids
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    out_s[:, :kk] = scores
    out_i[:, :kk] = ids
    return out_s, out_i


def faiss_cpu_search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    scores, ids = index.search(xq, k)
    scores[ids < 0] = -np.inf
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def _to_device(x, dev):
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to(dev, torch.float32)
    return torch.as_tensor(_as_float32(x)).to(dev)


def torch_topk(xq_t, xb_t, k: int, block: int | None = None, matmul_dtype=None, xb_mm=None):
    """Top-k of ``xq_t @ xb_t.T`` as device tensors ``(scores (nq, min(k, nb)) float32, rows int64)``.

    ``xq_t``, ``xb_t``: float32 tensors on one device. ``xb_mm`` is ``xb_t`` already cast to the
    matmul dtype (pass it to reuse it across calls). Queries go in blocks whose (block, nb) score
    matrix stays near 1 GiB on CUDA (256 MiB on CPU).
    """
    import torch

    dev = xb_t.device
    if matmul_dtype is None:
        matmul_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    nq, nb = xq_t.shape[0], xb_t.shape[0]
    kk = min(k, nb)
    xb_m = xb_mm if xb_mm is not None else xb_t.to(matmul_dtype)
    exact = matmul_dtype == torch.float32
    shortlist = kk if exact else min(nb, 2 * kk + 16)
    if block is None:
        budget = (1 << 30) if dev.type == "cuda" else (1 << 28)
        block = int(max(1, min(16384, budget // max(1, nb * xb_m.element_size()))))
    out_s = torch.empty((nq, kk), dtype=torch.float32, device=dev)
    out_i = torch.empty((nq, kk), dtype=torch.int64, device=dev)
    for start in range(0, nq, block):
        q = xq_t[start:start + block]
        sims = q.to(matmul_dtype) @ xb_m.T
        top_s, top_i = torch.topk(sims, shortlist, dim=1)
        del sims
        if not exact:
            # fp32 rescoring of the shortlist: (b, s, d) x (b, d) -> (b, s)
            top_s = torch.einsum("bsd,bd->bs", xb_t[top_i], q)
            top_s, order = torch.topk(top_s, kk, dim=1)
            top_i = torch.gather(top_i, 1, order)
        out_s[start:start + block] = top_s.float()
        out_i[start:start + block] = top_i
    return out_s, out_i


def torch_search(xq, xb, k: int, device: str = "cuda", block: int | None = None,
                 matmul_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Chunked matmul + top-k with torch on ``device``; exact fp32 scores, numpy results.

    ``matmul_dtype`` defaults to fp16 on CUDA (tensor cores) and fp32 elsewhere. With a reduced
    precision matmul, the top ``2k + 16`` are taken first and rescored in fp32. Tensors already on
    ``device`` are used without a copy.
    """
    import torch

    dev = torch.device(device)
    xq_t, xb_t = _to_device(xq, dev), _to_device(xb, dev)
    nq, nb = xq_t.shape[0], xb_t.shape[0]
    if nq == 0 or nb == 0:
        return _pad(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), k)
    out_s, out_i = torch_topk(xq_t, xb_t, k, block=block, matmul_dtype=matmul_dtype)
    return _pad(out_s.cpu().numpy(), out_i.cpu().numpy(), k)


def faiss_gpu_search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    res = faiss.StandardGpuResources()
    scores, ids = faiss.knn_gpu(res, xq, xb, min(k, xb.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
    return _pad(scores.astype(np.float32), ids.astype(np.int64), k)


def exact_search(xq, xb, k: int, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``xq`` (nq, d) against ``xb`` (nb, d).

    Returns ``(scores float32 (nq, k), ids int64 (nq, k))`` sorted by decreasing score; ids are row
    numbers of ``xb``; -1 / -inf where ``nb < k``. ``device``: None/"auto", "cpu" or "cuda[:i]".
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = resolve_device(device, faiss=True)
    if device.startswith("cuda") and k > GPU_MAX_K:
        logger.debug("k=%d > %d: exact search falls back to the CPU", k, GPU_MAX_K)
        device = "cpu"
    if device.startswith("cuda"):
        import faiss

        if faiss.get_num_gpus() > 0 and device in ("cuda", "cuda:0"):
            xq32, xb32 = _as_float32(xq), _as_float32(xb)
            _check_dims(xq32, xb32)
            return faiss_gpu_search(xq32, xb32, k)
        return torch_search(xq, xb, k, device=device)
    xq32, xb32 = _as_float32(xq), _as_float32(xb)
    _check_dims(xq32, xb32)
    if xb32.shape[0] == 0 or xq32.shape[0] == 0:
        return _pad(np.zeros((xq32.shape[0], 0), np.float32), np.zeros((xq32.shape[0], 0), np.int64), k)
    return faiss_cpu_search(xq32, xb32, k)


def _check_dims(xq: np.ndarray, xb: np.ndarray) -> None:
    if xq.ndim != 2 or xb.ndim != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError(f"exact_search needs (nq, d) and (nb, d) arrays, got {xq.shape} and {xb.shape}")


def rescore(xq: np.ndarray, candidates: np.ndarray, gather, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for candidate ids (nq, c) with vectors from ``gather(ids) -> (n, d)``; the best k.

    Used to refine lossy (SQ/PQ) results and the Matryoshka shortlist with the full raw vectors.
    """
    nq, c = candidates.shape
    full = np.asarray(gather(candidates.ravel()), dtype=np.float32).reshape(nq, c, -1)
    scores = np.einsum("qcd,qd->qc", full, np.asarray(xq, dtype=np.float32))
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return _pad(np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(candidates, order, 1), k)
