"""``evaluate``: a model directory + a collection -> UnED metrics and a report directory.

Embeds the query and index splits of every domain once into an embedding store kept in a cache
(keyed by the model's config hash, the collection and the split, so a second evaluation of the same
model and data embeds nothing), then runs the merged and/or separate protocol
(:mod:`uniret.eval.protocol`) and, with ``out``, writes metrics.json, report.md and report.html.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..data import Item, ItemList, open_collection
from ..errors import UniretError
from ..utils import git_commit, stable_hash
from .protocol import PROTOCOLS, RERANKERS, evaluate_embeddings

logger = logging.getLogger("uniret")

SPLITS = ("test", "val")


def plan_items(collection, split: str) -> tuple[list[Item], dict[str, tuple[str, str]]]:
    """Every item the evaluation needs (query and index splits of each domain, each split once) and
    each domain's (query split, index split)."""
    pairs: dict[str, tuple[str, str]] = {}
    for d in collection.domains:
        if not collection.has_split(d, split):
            logger.warning("domain %s has no %s split: left out of the evaluation", d, split)
            continue
        pairs[d] = collection.query_index_splits(d, split)
    if not pairs:
        raise UniretError(f"{collection.root}: no domain has a {split!r} split; evaluate --split test or val")
    items: list[Item] = []
    for d, splits in pairs.items():
        for s in dict.fromkeys(splits):
            items.extend(Item(r.path, d, s, i, r.class_ids) for i, r in enumerate(collection.records(d, s)))
    return items, pairs


def data_key(collection, items: list[Item]) -> str:
    """A hash of where the data is and what it holds (paths and labels of the evaluated items)."""
    content = stable_hash([[it.domain, it.split, it.path, list(it.class_ids)] for it in items])
    return stable_hash({"root": str(Path(collection.root).resolve()), "content": content})


def cached_store(model, collection, items: list[Item], split: str, cache_dir: Path, device=None,
                 batch_size: int = 64, workers: int = 0):
    """The embedding store of ``items`` under ``cache_dir``: reused when the same model embedded the
    same data before, otherwise computed (resumably) with ``uniret.embed.extract.embed_items``."""
    from ..embed.store import open_finished, store_fingerprint

    model_hash = model.config_hash()
    path = Path(cache_dir) / f"{model_hash}-{data_key(collection, items)[:12]}-{split}"
    store = open_finished(path, store_fingerprint(items, model.config.dim, "float16", model_hash))
    if store is not None:
        logger.info("reusing embeddings in %s", path)
        return store, True
    logger.info("embedding %d images into %s", len(items), path)
    from ..embed.extract import embed_items

    store = embed_items(model, ItemList(items, source=collection), path, batch_size=batch_size,
                        workers=workers, device=device, dtype="float16", resume=True)
    return store, False


def protocol_rows(items: list[Item], pairs: dict[str, tuple[str, str]], valid: np.ndarray):
    """Row numbers (in ``items``) of the queries and of the merged index; failed rows left out."""
    where = {(it.domain, it.split): [] for it in items}
    for i, it in enumerate(items):
        if valid[i]:
            where[(it.domain, it.split)].append(i)
    q_rows = [i for d, (qs, _) in pairs.items() for i in where[(d, qs)]]
    x_rows = [i for d, (_, xs) in pairs.items() for i in where[(d, xs)]]
    return np.asarray(q_rows, dtype=np.int64), np.asarray(x_rows, dtype=np.int64)


def summary_of(result: dict) -> dict:
    """The JSON-able part of an :func:`evaluate_embeddings` result."""
    keys = ("mean", "per_domain", "queries", "evaluated", "excluded", "protocol", "k", "rerank", "index")
    return {k: result[k] for k in keys if k in result}


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    split: str = "test",
    protocol: str = "merged",
    rerank: str | None = None,
    index_kind: str = "flat",
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    k: int = 100,
    device: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    samples: int = 4,
    model=None,
) -> dict:
    """Evaluate a model on a collection (METHOD.md §2); write a report directory when ``out`` is set.

    ``protocol``: merged, separate or both. ``rerank``: none, superglobal, aqe or alpha-qe.
    ``index_kind``: flat (exact search) or a kind of ``uniret.index.build_index`` for the merged
    index. ``samples``: sample queries per domain shown in report.html. ``model``: an already loaded
    model (the demo passes it) instead of loading ``model_dir``.
    """
    if split not in SPLITS:
        raise UniretError(f"--split must be test or val, not {split!r}")
    if protocol not in (*PROTOCOLS, "both"):
        raise UniretError(f"--protocol must be merged, separate or both, not {protocol!r}")
    if (rerank or "none") not in RERANKERS:
        raise UniretError(f"--rerank must be one of {', '.join(RERANKERS)}, not {rerank!r}")
    if index_kind != "flat":
        from ..index.keys import KINDS

        if index_kind not in KINDS:
            raise UniretError(f"--index-kind must be one of {', '.join(KINDS)}, not {index_kind!r}")
    started = time.time()
    collection = open_collection(data)
    items, pairs = plan_items(collection, split)
    if cache_dir is None:
        cache_dir = (Path(out).resolve().parent if out else Path.cwd()) / ".cache" / "embeddings"
    per_domain = isinstance(model_dir, dict)
    if per_domain:
        # "Specialist + Oracle": each domain's queries and index embedded by that domain's own model.
        if index_kind != "flat":
            raise UniretError("per-domain models (DOMAIN=DIR) are evaluated with exact search: drop --index-kind")
        missing = sorted(set(pairs) - set(model_dir))
        if missing:
            raise UniretError(f"no model for domain(s) {', '.join(missing)}: pass --model DOMAIN=DIR for each")
    from ..embed.model import load_model

    models = ({d: load_model(model_dir[d]) for d in pairs} if per_domain
              else {None: model if model is not None else load_model(model_dir)})
    vectors, valid, stores, reused = None, np.ones(len(items), dtype=bool), {}, True
    for key, m in models.items():
        rows = [i for i, it in enumerate(items) if key is None or it.domain == key]
        part, was_cached = cached_store(m, collection, [items[i] for i in rows], split, Path(cache_dir),
                                        device=device, batch_size=batch_size, workers=workers)
        if vectors is None:
            vectors = np.zeros((len(items), part.dim), dtype=np.float32)
        if part.dim != vectors.shape[1]:
            raise UniretError(f"per-domain models must share one embedding size ({part.dim} vs {vectors.shape[1]})")
        vectors[rows] = np.asarray(part.embeddings, dtype=np.float32)
        valid[rows] = part.valid_mask
        stores[key] = part
        reused = reused and was_cached
    model_hash = (stores[None].model_hash if not per_domain
                  else stable_hash({d: s.model_hash for d, s in stores.items()}))
    q_rows, x_rows = protocol_rows(items, pairs, valid)
    q_items, x_items = [items[i] for i in q_rows], [items[i] for i in x_rows]
    self_match = any(qs == xs for qs, xs in pairs.values())
    protocols = list(PROTOCOLS) if protocol == "both" else [protocol]
    results = {}
    for p in protocols:
        if index_kind != "flat" and p == "merged":
            from .indexed import evaluate_with_index

            results[p] = evaluate_with_index(vectors[q_rows], q_items, vectors[x_rows], x_items, self_match, k=k,
                                             rerank=rerank, index_kind=index_kind, device=device,
                                             work_dir=Path(cache_dir) / "indexes", key=Path(stores[None].path).name,
                                             model_hash=model_hash)
        else:
            results[p] = evaluate_embeddings(vectors[q_rows], q_items, vectors[x_rows], x_items, self_match, k=k,
                                             protocol=p, rerank=rerank, device=device)
    report = {
        "format": "uniret-eval-report/1",
        "model": ({"per_domain": {d: {"dir": str(model_dir[d]), "config_hash": stores[d].model_hash,
                                      **_model_info(models[d])} for d in models},
                   "dir": ", ".join(f"{d}={model_dir[d]}" for d in models),
                   "config_hash": model_hash} if per_domain else
                  {"dir": str(model_dir) if model_dir else None, "config_hash": model_hash,
                   **_model_info(models[None])}),
        "data": {"path": str(Path(data).resolve()), "split": split, "key": data_key(collection, items),
                 "domains": {d: {"query_split": qs, "index_split": xs} for d, (qs, xs) in pairs.items()},
                 "failed_images": int((~valid).sum())},
        "protocol": protocol,
        "rerank": rerank or "none",
        "index_kind": index_kind,
        "k": k,
        "results": {p: summary_of(r) for p, r in results.items()},
        "embeddings": ({"stores": {d: str(st.path) for d, st in stores.items()}} if per_domain else
                       {"store": str(stores[None].path)}) | {"reused": reused, "count": len(items),
                                                              "dim": int(vectors.shape[1])},
        "uniret_commit": git_commit(),
        "seconds": round(time.time() - started, 2),
    }
    if out is not None:
        from .report import sample_queries, write_report

        first = results[protocols[0]]
        grid = sample_queries(first, q_items, x_items, collection, per_domain=samples)
        write_report(out, report, grid)
        report["out"] = str(out)
    return report


def _model_info(model) -> dict:
    config = getattr(model, "config", None)
    info = {}
    for key in ("backbone", "dim"):
        if hasattr(config, key):
            info[key] = getattr(config, key)
    return info
