"""``evaluate``: a model directory + a collection -> UnED metrics and a report directory.

Loads the model(s), embeds the query and index splits through the embedding cache
(:mod:`uniret.eval.embeddings`), runs the merged and/or separate protocol
(:mod:`uniret.eval.protocol`; through a built index with ``index_kind``, :mod:`uniret.eval.indexed`),
builds the report dict and, with ``out``, writes metrics.json, report.md and report.html
(:mod:`uniret.eval.report`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..data import Item, open_collection
from ..errors import UniretError
from ..guards import check_apart, check_writable, claim_output
from ..index.keys import KINDS
from ..index.rerank import get_reranker
from ..utils import git_commit, resolve_device
from .embeddings import EvalEmbeddings, data_key, embed_for_evaluation, plan_items
from .protocol import PROTOCOLS, evaluate_embeddings
from .report import FORMAT as REPORT_FORMAT
from .report import is_report

SPLITS = ("test", "val")


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
    overwrite: bool = False,
) -> dict:
    """Evaluate a model on a collection (METHOD.md §2); write a report directory when ``out`` is set.

    ``model_dir``: a model directory, ``{domain: dir}`` (each domain embedded by its own model), or None
    for the default model (:mod:`uniret.embed.default`). ``data`` may be an image folder with class
    subfolders (:class:`uniret.data.folder.LabelledFolder`: every image searched against the others).
    ``protocol``: merged, separate or both. ``rerank``: none or a name of
    :data:`uniret.index.rerank.RERANKERS`. ``index_kind``: flat (exact search) or a kind of
    ``uniret.index.build_index`` for the merged index. ``samples``: sample queries per domain shown
    in report.html. ``model``: an already loaded model (the demo passes it) instead of loading
    ``model_dir``. ``out`` is a new or empty directory, or (with ``overwrite``) an earlier report;
    never inside the data or a model (:func:`uniret.guards.claim_output`).
    """
    if split not in SPLITS:
        raise UniretError(f"--split must be test or val, not {split!r}")
    if protocol not in (*PROTOCOLS, "both"):
        raise UniretError(f"--protocol must be merged, separate or both, not {protocol!r}")
    get_reranker(rerank)  # an unknown name fails here, before anything is embedded
    resolve_device(device)  # so does a bad --device
    if index_kind != "flat" and index_kind not in KINDS:
        raise UniretError(f"--index-kind must be one of {', '.join(KINDS)}, not {index_kind!r}")
    started = time.time()
    models_in = list(model_dir.values()) if isinstance(model_dir, dict) else [model_dir]
    if cache_dir is not None:
        check_apart(cache_dir, [data, *models_in], option="--cache-dir")
        check_writable(cache_dir, option="--cache-dir")
    if out is None:
        return _evaluate(model_dir, data, split, protocol, rerank, index_kind, None, cache_dir, k, device,
                         batch_size, workers, samples, model, started)
    with claim_output(out, "evaluation report", is_report, inputs=[data, *models_in], overwrite=overwrite):
        return _evaluate(model_dir, data, split, protocol, rerank, index_kind, Path(out), cache_dir, k, device,
                         batch_size, workers, samples, model, started)


def _evaluate(model_dir, data, split, protocol, rerank, index_kind, out, cache_dir, k, device, batch_size,
              workers, samples, model, started) -> dict:
    collection = open_collection(data)
    items, pairs = plan_items(collection, split)
    if cache_dir is None:
        cache_dir = (Path(out).resolve().parent if out else Path.cwd()) / ".cache" / "embeddings"
    models = load_models(model_dir, model, pairs, index_kind)
    embedded = embed_for_evaluation(models, collection, items, split, Path(cache_dir), device=device,
                                    batch_size=batch_size, workers=workers)
    q_rows, x_rows = protocol_rows(items, pairs, embedded.valid)
    q_items, x_items = [items[i] for i in q_rows], [items[i] for i in x_rows]
    q_vectors, x_vectors = embedded.vectors[q_rows], embedded.vectors[x_rows]
    self_match = any(qs == xs for qs, xs in pairs.values())
    protocols = list(PROTOCOLS) if protocol == "both" else [protocol]
    results = {}
    for p in protocols:
        if index_kind != "flat" and p == "merged":
            from .indexed import evaluate_with_index

            results[p] = evaluate_with_index(q_vectors, q_items, x_vectors, x_items, self_match, k=k, rerank=rerank,
                                             index_kind=index_kind, device=device,
                                             work_dir=Path(cache_dir) / "indexes",
                                             key=Path(embedded.stores[None].path).name,
                                             model_hash=embedded.model_hash)
        else:
            results[p] = evaluate_embeddings(q_vectors, q_items, x_vectors, x_items, self_match, k=k,
                                             protocol=p, rerank=rerank, device=device)
    report = build_report(model_dir=model_dir, models=models, embedded=embedded, data=data,
                          data_key=data_key(collection, items), split=split, pairs=pairs, protocol=protocol,
                          rerank=rerank, index_kind=index_kind, k=k, results=results, started=started)
    if out is not None:
        from .report import sample_queries, write_report

        grid = sample_queries(results[protocols[0]], q_items, x_items, collection, per_domain=samples)
        write_report(out, report, grid)
        report["out"] = str(out)
    return report


def load_models(model_dir, model, pairs: dict, index_kind: str) -> dict:
    """``{None: model}``, or ``{domain: model}`` for per-domain model directories (checked to cover
    every evaluated domain)."""
    from ..embed.model import load_model
    from ..utils import announce_model_load

    if model is not None:
        return {None: model}
    announce_model_load(", ".join(f"{d}={p}" for d, p in model_dir.items()) if isinstance(model_dir, dict)
                        else model_dir)
    if model_dir is None:
        from ..embed.default import default_model

        return {None: default_model()}
    if not isinstance(model_dir, dict):
        return {None: load_model(model_dir)}
    # "Specialist + Oracle": each domain's queries and index embedded by that domain's own model.
    if index_kind != "flat":
        raise UniretError("per-domain models (DOMAIN=DIR) are evaluated with exact search: drop --index-kind")
    missing = sorted(set(pairs) - set(model_dir))
    if missing:
        raise UniretError(f"no model for domain(s) {', '.join(missing)}: pass --model DOMAIN=DIR for each")
    return {d: load_model(model_dir[d]) for d in pairs}


def build_report(*, model_dir, models: dict, embedded: EvalEmbeddings, data, data_key: str, split: str,
                 pairs: dict, protocol: str, rerank: str | None, index_kind: str, k: int, results: dict,
                 started: float) -> dict:
    """The report dict (metrics.json): what was evaluated, how, and the JSON-able results."""
    stores = embedded.stores
    if None in models:
        model_info = {"dir": str(model_dir) if model_dir else None, "config_hash": embedded.model_hash,
                      **_model_info(models[None])}
        store_info = {"store": str(stores[None].path)}
    else:
        model_info = {"per_domain": {d: {"dir": str(model_dir[d]), "config_hash": stores[d].model_hash,
                                         **_model_info(models[d])} for d in models},
                      "dir": ", ".join(f"{d}={model_dir[d]}" for d in models),
                      "config_hash": embedded.model_hash}
        store_info = {"stores": {d: str(st.path) for d, st in stores.items()}}
    return {
        "format": REPORT_FORMAT,
        "model": model_info,
        "data": {"path": str(Path(data).resolve()), "split": split, "key": data_key,
                 "domains": {d: {"query_split": qs, "index_split": xs} for d, (qs, xs) in pairs.items()},
                 "failed_images": int((~embedded.valid).sum())},
        "protocol": protocol,
        "rerank": rerank or "none",
        "index_kind": index_kind,
        "k": k,
        "results": {p: summary_of(r) for p, r in results.items()},
        "embeddings": store_info | {"reused": embedded.reused, "count": len(embedded.valid),
                                    "dim": int(embedded.vectors.shape[1])},
        "uniret_commit": git_commit(),
        "seconds": round(time.time() - started, 2),
    }


def _model_info(model) -> dict:
    config = getattr(model, "config", None)
    info = {}
    for key in ("backbone", "dim"):
        if hasattr(config, key):
            info[key] = getattr(config, key)
    return info
