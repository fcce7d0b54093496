"""``uniret demo``: the whole pipeline on the generated demo collection, on a CPU, in a few minutes.

It sits beside ``cli.py``, above every package, because it is the one library module besides the
trainer's own that imports ``uniret.train`` (data/, embed/, index/ and eval/ never do).

make the demo data -> train UDON briefly (a tiny CNN from scratch) -> export the model -> embed ->
evaluate on the merged protocol without and with SuperGlobal reranking (and the untrained model as
the baseline) -> build the merged index (with the model copy) -> search one query -> print where
the HTML report is and the `uniret serve` command that opens the index in a browser.
Every stage leaves its output under ``out`` and is skipped when it is already there, so a second
run (or a run after an interruption) continues instead of starting over.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np
import typer

from .display import display_score, emit, printable
from .guards import claim_output, has_format, in_range
from .utils import atomic_write_json, read_json

logger = logging.getLogger("uniret")


def train_demo_model(data: Path, run: Path, steps: int | None, device: str | None) -> Path:
    """Train UDON on the demo data with the demo recipe (``uniret.train.DEMO_RECIPE``: timm's tiny
    test ResNet at 64 px from scratch; ``steps`` None: the recipe's), resuming an interrupted run;
    return the exported model directory."""
    from .train.config import demo_config
    from .train.trainer import train

    overrides = {"device": device or "auto"}
    if steps is not None:
        overrides.update(steps=steps, val_every=max(1, steps // 3), ckpt_every=max(1, steps // 3),
                         dynamic_interval=max(1, steps // 6), dynamic_window=max(1, steps // 6))
    config = demo_config(data, run, **overrides)
    if (run / "summary.json").is_file() and (run / "model" / "config.json").is_file():
        if read_json(run / "summary.json").get("steps") == config.steps:
            logger.info("training already done: %s", run / "model")
            return run / "model"
    logger.info("training UDON for %d steps (%s at %d px)", config.steps, config.backbone, config.image_size)
    resume = (run / "train_config.json").is_file()
    return Path(train(config, resume=resume)) / "model"


def search_one_query(report: dict, data: Path, index_dir: Path, model_dir: Path | None = None,
                     kind: str = "flat") -> list[dict]:
    """Build the merged index from the evaluation's embeddings (with a copy of ``model_dir``, so that
    ``uniret search`` and ``uniret serve`` embed query images) and search with one test query."""
    from .data import open_collection
    from .embed.store import EmbeddingStore, write_store

    store = EmbeddingStore(report["embeddings"]["store"])
    items, vectors = store.items, np.asarray(store.embeddings, dtype=np.float32)
    coll = open_collection(data)
    splits = {d: (qs, xs) for d, (qs, xs) in ((d, coll.query_index_splits(d, "test")) for d in coll.domains)}
    x_rows = [i for i, it in enumerate(items) if it.split == splits[it.domain][1]]
    q_row = next(i for i, it in enumerate(items) if it.split == "test" and splits[it.domain][1] == "index")
    index_store = write_store(index_dir.parent / "index-store", vectors[x_rows], [items[i] for i in x_rows],
                              model={"config_hash": store.model_hash})
    from .index import Searcher, build_index

    build_index(index_store, index_dir, kind=kind, model_dir=model_dir, overwrite=True)
    scores, ids = Searcher.open(index_dir).search(vectors[q_row:q_row + 1], 5)
    query = items[q_row]
    rows = [{"rank": 0, "domain": query.domain, "class_ids": list(query.class_ids), "score": None,
             "match": "query", "path": query.path}]
    for r, (s, j) in enumerate(zip(scores[0], ids[0], strict=True)):
        if j < 0:
            continue
        hit = index_store.items[j]
        same = hit.domain == query.domain and bool(set(hit.class_ids) & set(query.class_ids))
        rows.append({"rank": r + 1, "domain": hit.domain, "class_ids": list(hit.class_ids), "score": display_score(s),
                     "match": "yes" if same else "no", "path": hit.path})
    return rows


def run_demo(out: str | Path = "uniret-demo", steps: int | None = None, device: str | None = None,
             scale: float = 1.0) -> dict:
    """Run every stage (``scale`` 1.0: about 1000 images); returns the paths and the mean metrics of
    each evaluation. ``out`` is a new or empty folder, or one an earlier demo run made."""
    out = Path(out)
    with claim_output(out, "uniret demo folder", is_demo_dir, overwrite=True):
        # A demo folder of our own continues where it stopped (no --overwrite needed); anything else
        # non-empty is refused.
        atomic_write_json(out / MARKER, {"format": FORMAT})
        return _run_demo(out, steps, device, scale)


MARKER, FORMAT = "uniret-demo.json", "uniret-demo/1"


def is_demo_dir(path: Path) -> bool:
    """A folder that ``uniret demo`` made (its marker file)."""
    return has_format(path, MARKER, FORMAT.split("/")[0])


def _run_demo(out: Path, steps: int | None, device: str | None, scale: float) -> dict:
    from .data.demo import make_demo
    from .eval.report import COMPARE_LABELS, compare_rows
    from .eval.run import evaluate

    data, reports = out / "data", out / "reports"
    if not (data / "info").is_dir():
        logger.info("making the demo collection in %s", data)
        make_demo(data, seed=0, scale=scale)
    model_dir = train_demo_model(data, out / "run", steps, device)

    import torch

    from .embed.model import build_model
    from .train.config import DEMO_RECIPE

    with torch.random.fork_rng(devices=[]):  # seed 0, as `uniret model init`: not whatever training left
        torch.manual_seed(0)
        untrained = build_model(DEMO_RECIPE["backbone"], image_size=DEMO_RECIPE["image_size"])
    cache = reports / ".cache" / "embeddings"
    runs = {
        "untrained": dict(model_dir=None, model=untrained, rerank="none"),
        "udon": dict(model_dir=model_dir, rerank="none"),
        "udon+superglobal": dict(model_dir=model_dir, rerank="superglobal"),
    }
    results = {}
    for name, kw in runs.items():
        results[name] = evaluate(data=data, split="test", protocol="merged", out=reports / name, cache_dir=cache,
                                 device=device, overwrite=True, **kw)
    rows, columns = compare_rows([str(reports / name) for name in runs])
    for row in rows:
        row["report"] = Path(row["report"]).name
    emit(rows, columns, title="merged test protocol (mean over domains, unweighted)",
         metrics=columns[len(COMPARE_LABELS):])
    hits = search_one_query(results["udon"], data, out / "index", model_dir=model_dir)
    emit(hits, ["rank", "domain", "class_ids", "score", "match", "path"], title="\none query, top 5 of the merged index",
         metrics=["score"])
    html = (reports / "udon" / "report.html").resolve()
    typer.echo(f"\nHTML report: {printable(html)}\nopen it in a browser (file://{printable(html)})")
    serve = f"uniret serve {shlex.quote(str(out / 'index'))} --images {shlex.quote(str(data))}"
    typer.echo(f"\nsearch the index in a browser:\n  {printable(serve)}\nthen open http://127.0.0.1:8000/")
    return {"out": str(out), "model": str(model_dir), "report": str(html), "serve": serve,
            "mean": {name: r["results"]["merged"]["mean"] for name, r in results.items()}}


def demo_command(
    out: Path = typer.Option(Path("uniret-demo"), "--out", help="Folder for the data, model, indexes and reports."),
    steps: int = typer.Option(None, "--steps", help="Training steps (default: the demo's short schedule)."),
    scale: float = typer.Option(1.0, "--scale", help="Demo collection size (1.0: about 1000 images)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: a GPU when there is one)."),
) -> None:
    """Run the whole pipeline on the demo data: make data, train UDON briefly, embed, index, evaluate, search."""
    if steps is not None:
        in_range(steps, "--steps", 2, 1_000_000)
    in_range(scale, "--scale", 0, 4, low_open=True)
    run_demo(out, steps=steps, device=device, scale=scale)
