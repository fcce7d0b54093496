"""nprobe of an on-disk index tuned to a recall target, within the build's memory budget.

Like :func:`uniret.index.keys.tune` for in-RAM indexes: a sample of the stored vectors is searched
at nprobe 1, 2, 4, ... until recall@k against exact search reaches the target. Here the exact
search streams the raw vectors block by block (:func:`~uniret.index.ondisk.vectors.exact_search_chunked`),
and the index is re-opened for every batch of queries, sized so that the lists one batch probes fit
the merge window: the mapped pages of earlier batches are unmapped with it, so tuning a 10M-vector
index does not hold its whole ``lists.ivfdata`` in RSS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exact import REFINE_FACTOR, rescore
from ..keys import is_lossy, ivf_of, set_search_param, tune
from .lists import read_version_index
from .vectors import MappedArray, exact_search_chunked

LIST_IMBALANCE = 3  # probed lists are the popular ones: assume 3x the mean list size


def tune_ondisk(version_dir: Path, manifest: dict, ids: np.ndarray, k: int, target: float, sample: int,
                seed: int, window_bytes: int) -> dict:
    """Tune nprobe on ``sample`` stored vectors used as queries; returns :func:`tune`'s dict."""
    raw = MappedArray(Path(version_dir) / "vectors.npy")
    n = len(raw)
    k = min(k, n)
    rows = np.random.default_rng(seed + 1).choice(n, min(sample, n), replace=False)
    queries = raw.gather(rows)
    _, truth_rows = exact_search_chunked(queries, raw, k)
    truth = np.where(truth_rows >= 0, ids[np.maximum(truth_rows, 0)], -1)
    holder = read_version_index(version_dir, manifest, mmap=False)  # carries nprobe between tune's calls
    ivf = ivf_of(holder)
    list_bytes = manifest["on_disk"]["ivfdata_bytes"] / max(1, ivf.nlist)

    def gather(wanted: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
        return raw.gather(np.where((wanted >= 0) & (ids[at] == wanted), at, -1))

    def search(xq: np.ndarray, kk: int) -> np.ndarray:
        per_query = LIST_IMBALANCE * ivf.nprobe * list_bytes
        batch = int(max(1, min(len(xq), window_bytes // max(1.0, per_query))))
        found = []
        for b in range(0, len(xq), batch):
            index = read_version_index(version_dir, manifest)
            set_search_param(index, ivf.nprobe)
            q = xq[b:b + batch]
            if is_lossy(manifest["key"]):
                found.append(rescore(q, index.search(q, kk * REFINE_FACTOR)[1], gather, kk)[1])
            else:
                found.append(index.search(q, kk)[1])
            del index  # unmaps the lists this batch touched
            raw.release()
        return np.concatenate(found)

    result = tune(holder, queries, truth, k, target, search=search)
    result.update(k=k, sample=len(rows), target=target)
    return result
