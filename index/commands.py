"""CLI: ``uniret index build|add|remove|info``, ``uniret search`` and ``uniret dedup``."""

from __future__ import annotations

import logging
import re
from enum import Enum
from pathlib import Path

import typer

from ..cluster import check_engine
from ..data.folder import LAYOUTS
from ..display import OutputFormat, display_score, emit
from ..embed.commands import Engine, RayAddressOpt, Runtime, RuntimeOpt
from ..errors import UsageError
from ..guards import check_output_file, file_has_format, in_range
from .rerank import reranker_names

logger = logging.getLogger("uniret")
# faiss announces which SIMD build it loads at INFO level; that is noise on the command line.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
logging.getLogger("faiss.contrib").setLevel(logging.WARNING)

index_app = typer.Typer(no_args_is_help=True)


class GpuMode(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


#: ``--rerank`` choices: ``none`` and the registered rerankers (read from the registry, never listed here).
RerankChoice = Enum("RerankChoice", {name: name for name in reranker_names()}, type=str)


#: ``--layout``: how labels are read from an image folder's subfolders (uniret.data.folder.LAYOUTS).
LayoutChoice = Enum("LayoutChoice", {name: name for name in LAYOUTS}, type=str)
LayoutOpt = typer.Option("auto", "--layout", help="Image folders: labels from root/<class>/IMG (class), "
                         "root/<domain>/<class>/IMG (domain-class), none (flat), or auto (by depth).")
FormatOpt = typer.Option(OutputFormat.table, "--format", help="table or json.")
GpuOpt = typer.Option(GpuMode.auto, "--gpu", help="auto: use Faiss GPUs when there are some; on: require; off: CPU.")


def parse_bytes(text: str | None) -> int | None:
    """``8G``, ``512M``, ``1.5T`` or a plain number of bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise UsageError(f"--max-memory {text!r}: expected a size like 8G, 512M or 1000000")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _summary_rows(manifest: dict, root: Path) -> list[dict]:
    rec = manifest.get("recall") or {}
    params = ", ".join(f"{k}={v}" for k, v in (manifest.get("search_params") or {}).items()) or "-"
    model = manifest.get("model") or {}
    return [
        {"field": "index", "value": str(root)},
        {"field": "key", "value": manifest["key"]},
        {"field": "storage", "value": _storage(manifest)},
        {"field": "count", "value": manifest["count"]},
        {"field": "dim", "value": manifest["dim"]},
        {"field": "metric", "value": manifest["metric"]},
        {"field": "search params", "value": params},
        {"field": f"recall@{rec.get('k', '-')} (at build)", "value": rec.get("recall")},
        {"field": "model", "value": f"{model.get('config_hash')} ({model.get('backbone', '?')})"},
        {"field": "model copy", "value": manifest.get("model_dir") or "none (image queries need --model)"},
        {"field": "next id", "value": manifest["next_id"]},
        {"field": "images", "value": ", ".join(e["path"] for e in manifest.get("images") or [])
         or "none recorded (pictures need --images)"},
        {"field": "updates", "value": len(manifest.get("history", []))},
    ]


def _storage(manifest: dict) -> str:
    info = manifest.get("on_disk")
    if not info:
        return "in RAM (index.faiss is read whole)"
    from .ondisk import fmt_bytes

    return f"on-disk: {info['ivfdata']} ({fmt_bytes(info['ivfdata_bytes'])}) memory-mapped, {info['shards']} shard(s)"


@index_app.command("build")
def index_build(
    store: Path = typer.Argument(..., help="Embedding store (from `uniret embed`), or images to embed first: an "
                                 "image folder (labels from class subfolders), collection root, packed store or "
                                 "webdataset shards.", metavar="STORE_OR_IMAGES"),
    out: Path = typer.Option(..., "--out", help="Index directory to write (an existing index gets a new version "
                                                "with --overwrite)."),
    kind: str = typer.Option("auto", "--kind", help="auto, flat, ivf-flat, ivf-sq8, ivf-pq, hnsw or a Faiss factory string."),
    gpu: GpuMode = GpuOpt,
    gpus: int = typer.Option(None, "--gpus", help="How many GPUs to use (default: all Faiss sees)."),
    shard: bool = typer.Option(False, "--shard", help="Shard the index over the GPUs (capacity) instead of replicating."),
    max_memory: str = typer.Option(None, "--max-memory", help="Memory budget of the index (e.g. 8G); auto picks codes to fit."),
    target_recall: float = typer.Option(0.95, "--target-recall", help="Recall@k that nprobe/efSearch are tuned to."),
    recall_k: int = typer.Option(100, "--recall-k", help="k of the recall target."),
    model: Path = typer.Option(None, "--model", help="Model directory that made the store (images: that embeds "
                                                     "them; default: the pretrained default model); copied into "
                                                     "the index so that `uniret search` can embed query images."),
    layout: LayoutChoice = LayoutOpt,
    batch_size: int = typer.Option(64, "--batch-size", help="Images: images per embedding batch."),
    device: str = typer.Option(None, "--device", help="Images: where they are embedded (auto, cpu, cuda, cuda:N)."),
    on_disk: bool = typer.Option(False, "--on-disk", help="IVF lists on disk, searched memory-mapped (--kind ivf-flat|"
                                 "ivf-sq8|ivf-pq; auto = ivf-sq8); --max-memory is then the build's peak RSS (default 4G)."),
    workers: int = typer.Option(None, "--workers", help="--on-disk: encoding processes (default: CPU count, as "
                                                        "--max-memory allows); images: decoding processes."),
    shard_rows: int = typer.Option(None, "--shard-rows", help="--on-disk: store rows per IVF shard (default: what "
                                                              "--max-memory allows, at most 1M)."),
    train_only: bool = typer.Option(False, "--train-only", help="--on-disk step 1 of 3: train the quantizer, plan "
                                                                "the shards (in INDEX/ondisk-build)."),
    encode_part: str = typer.Option(None, "--encode-part", metavar="I/N", help="--on-disk step 2: encode the shards "
                                    "of part I of N (0-based; one machine each)."),
    merge: bool = typer.Option(False, "--merge", help="--on-disk step 3: merge all shards into a new index version."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Build a new version of the index already at --out."),
    engine: Engine = typer.Option(Engine.local, "--engine", help="--on-disk: encode the shards with processes of "
                                  "this machine (local) or as Ray tasks (ray; pip install 'uniret[ray]')."),
    ray_address: str = RayAddressOpt,
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Build an index from an embedding store (in RAM, or --on-disk in resumable steps), or from images
    in one step (embedded with --model, or the default model; resumable)."""
    from .from_images import build_from_images, is_store_path
    from .layout import read_manifest

    on_ray = check_engine(engine.value, ray_address) == "ray"
    if on_ray and (not on_disk or train_only or merge):
        raise UsageError("--engine ray runs the encode step of an --on-disk build; add --on-disk (and no "
                         "--train-only or --merge)")
    if not is_store_path(store):
        if on_disk or train_only or encode_part or merge or shard_rows is not None:
            raise UsageError(f"{store} is not an embedding store: --on-disk builds start from one; embed the images "
                             "first with `uniret embed --data IMAGES --out STORE`")
        version = build_from_images(store, out, model=model, layout=layout.value, kind=kind, gpu=gpu.value, gpus=gpus,
                                    max_memory=parse_bytes(max_memory), target_recall=target_recall,
                                    recall_k=recall_k, overwrite=overwrite, batch_size=batch_size,
                                    workers=workers, device=device)
        manifest = read_manifest(version)
        return emit(_summary_rows(manifest, out), ["field", "value"], fmt, extra={"manifest": manifest})
    if on_disk:
        from . import ondisk as od

        step, part = od.check_step_options(on_disk, train_only, encode_part, merge, kind)
        budget = parse_bytes(max_memory)
        if step == "train":
            plan = od.train_step(store, out, kind, gpu.value, gpus, budget, workers, shard_rows, overwrite=overwrite)
            return emit([{"step": "train", "key": plan["key"], "shards": len(plan["shards"]),
                          "shard_rows": plan["shard_rows"], "trained_on": plan["train"]["on"]}],
                        ["step", "key", "shards", "shard_rows", "trained_on"], fmt, extra={"plan": plan})
        if step == "encode":
            res = od.encode_step(store, out, budget, workers, part, engine.value, ray_address)
            return emit([dict(res, step=f"encode {part[0]}/{part[1]}")],
                        ["step", "shards", "encoded", "workers", "seconds"], fmt)
        if step == "merge":
            version = od.merge_step(store, out, budget, target_recall, recall_k, model, overwrite=overwrite)
        else:
            version = od.build_ondisk(store, out, kind, gpu.value, gpus, budget, workers, shard_rows, target_recall,
                                      recall_k, model, overwrite=overwrite, engine=engine.value,
                                      ray_address=ray_address)
    else:
        from .build import build_index
        from .ondisk import check_step_options

        check_step_options(on_disk, train_only, encode_part, merge, kind)
        if workers is not None or shard_rows is not None:
            raise UsageError("--workers and --shard-rows apply to --on-disk builds; add --on-disk")
        version = build_index(store, out, kind=kind, gpu=gpu.value, gpus=gpus, max_memory=parse_bytes(max_memory),
                              target_recall=target_recall, recall_k=recall_k, model_dir=model, shard=shard,
                              overwrite=overwrite)
    manifest = read_manifest(version)
    emit(_summary_rows(manifest, out), ["field", "value"], fmt, extra={"manifest": manifest})


@index_app.command("add")
def index_add(
    index: Path = typer.Argument(..., help="Index directory."),
    store: Path = typer.Argument(..., help="Embedding store of the same model, or images to embed with the "
                                           "index's model (a folder, collection, packed store or shards).",
                                 metavar="STORE_OR_IMAGES"),
    max_memory: str = typer.Option(None, "--max-memory", help="On-disk indexes: peak RSS of the update (default 4G)."),
    workers: int = typer.Option(None, "--workers", help="On-disk indexes: encoding processes (default: CPU count); "
                                                        "images: decoding processes."),
    model: Path = typer.Option(None, "--model", help="Images: the model that embedded the index (default: its copy)."),
    layout: LayoutChoice = LayoutOpt,
    batch_size: int = typer.Option(64, "--batch-size", help="Images: images per embedding batch."),
    device: str = typer.Option(None, "--device", help="Images: where they are embedded (auto, cpu, cuda, cuda:N)."),
    replace: bool = typer.Option(False, "--replace", help="Replace items indexed at the same domain, split and path "
                                                          "whose content changed (they get new ids); without it "
                                                          "such items are refused."),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Add a store's (or a folder's) items to an index (items already present with the same content are
    skipped); crash-safe."""
    from .build import add_to_index
    from .from_images import add_images, is_store_path

    if is_store_path(store):
        res = add_to_index(index, store, max_memory=parse_bytes(max_memory), workers=workers, replace=replace)
    else:
        res = add_images(index, store, model=model, layout=layout.value, batch_size=batch_size, workers=workers,
                         device=device, max_memory=parse_bytes(max_memory), replace=replace)
    emit([res], ["added", "replaced", "skipped_present", "skipped_failed", "count", "version"], fmt)


@index_app.command("remove")
def index_remove(
    index: Path = typer.Argument(..., help="Index directory."),
    ids: Path = typer.Option(..., "--ids", help="File of ids to remove: one per line, a JSON list, a .npy, or "
                                                "the JSON that `uniret dedup --out` writes (its remove list)."),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Remove ids from an index; crash-safe."""
    from .build import remove_from_index
    from .ids import read_id_source

    remove, made_from = read_id_source(ids)
    res = remove_from_index(index, remove, made_from=made_from, what=f"--ids {ids}")
    emit([res], ["removed", "not_present", "count", "version"], fmt)


@index_app.command("info")
def index_info(index: Path = typer.Argument(..., help="Index directory."), fmt: OutputFormat = FormatOpt) -> None:
    """Show an index's key, size, model, search parameters and measured recall."""
    from .layout import current_version, read_manifest

    manifest = read_manifest(current_version(index))
    emit(_summary_rows(manifest, index), ["field", "value"], fmt, extra={"manifest": manifest})


def _check_html(path: Path | None, inputs: list, overwrite: bool, kind: str) -> None:
    """``--html``: a new .html file, or (with ``--overwrite``) a page of this ``kind`` that uniret
    wrote; never inside an input or another uniret output."""
    from ..pages import is_page

    if path is not None:
        check_output_file(path, f"{kind} page", lambda p: is_page(p, kind), inputs, overwrite, option="--html",
                          suffixes=(".html", ".htm"))


def _write_html(path: Path, page: str) -> None:
    from ..utils import atomic_write_text

    atomic_write_text(path, page)
    logger.info("wrote %s", path)


DEDUP_FORMAT = "uniret-dedup/1"


ImagesOpt = typer.Option(None, "--images", help="Packed store or collection/image folder of the indexed items "
                                                "(thumbnails in --html; default: the folder the index was built from).")
HtmlOpt = typer.Option(None, "--html", help="Also write a self-contained page of thumbnails here (OUT.html).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace a page (or JSON) that uniret wrote there before.")


def search_command(
    index: Path = typer.Argument(..., help="Index directory."),
    queries: list[str] = typer.Argument(..., help="Image files, folders of images, id:N or .npy embeddings.", metavar="QUERY..."),
    k: int = typer.Option(10, "--k", help="Results per query (at most the index size and 10000)."),
    rerank: RerankChoice = typer.Option("none", "--rerank", help="Global-feature reranking of the top candidates."),
    domain: str = typer.Option(None, "--domain", help="Only results from this domain."),
    where: list[str] = typer.Option(None, "--where", help="Only results whose metadata passes, e.g. \"label == 'cat'\" "
                                    "or \"price < 20\" (ops == != < <= > >= in; repeat: all must hold)."),
    threshold: float = typer.Option(None, "--threshold", help="Only results with a similarity at or above this."),
    shortlist_dim: int = typer.Option(None, "--shortlist-dim", help="Matryoshka funnel: shortlist with this prefix size."),
    shortlist_k: int = typer.Option(None, "--shortlist-k", help="Funnel shortlist length (default max(10k, 1000))."),
    model: Path = typer.Option(None, "--model", help="Model directory for image queries (default: the index's copy)."),
    images: Path = ImagesOpt,
    html: Path = HtmlOpt,
    overwrite: bool = OverwriteOpt,
    gpu: GpuMode = GpuOpt,
    device: str = typer.Option("auto", "--device", help="Where query images are embedded: auto, cpu, cuda or cuda:N."),
    runtime: Runtime = RuntimeOpt,
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Search an index by image, folder, stored id or embeddings; prints rank, id, score and metadata."""
    from .api import open_index

    _check_html(html, [index, images, model, *queries], overwrite, "search")
    in_range(k, "--k", 1)  # the option's range; the search layer checks k against the index
    from .filters import parse_where

    parse_where(where or None)  # a bad expression is one line before anything is loaded
    idx = open_index(index, device=device, gpu=gpu.value, model=model, images=images, runtime=runtime.value)
    if model is not None:
        idx.load_model()  # check that the given model made the index, even for id queries
    results = idx.search(queries, k=k, rerank=rerank.value, domain=domain, threshold=threshold,
                         shortlist_dim=shortlist_dim, shortlist_k=shortlist_k, where=where or None)
    if html is not None:
        _write_html(html, results.to_html(title=f"uniret search {index}"))
    rows = [dict(r, score=display_score(r["score"]),
                 class_id=r["class_ids"][0] if len(r.get("class_ids") or []) == 1 else r.get("class_ids") or None)
            for r in results.rows()]
    labelled = any(r.get("label") is not None for r in rows)
    emit(rows, ["query", "rank", "id", "score", "path", "domain", "class_id", *(["label"] if labelled else [])],
         fmt, metrics=["score"])


def dedup_command(
    index: Path = typer.Argument(..., help="Index directory."),
    threshold: float = typer.Option(None, "--threshold", help="Similarity in (0, 1] at or above which items are duplicates (default 0.95)."),
    fraction: float = typer.Option(None, "--fraction", help="Pick the threshold so that about this fraction (0, 1) of items is grouped."),
    neighbors: int = typer.Option(10, "--neighbors", help="Nearest neighbours examined per item (1-1000)."),
    out: Path = typer.Option(None, "--out", help="Write groups, keep and remove lists as JSON here "
                                                 "(`uniret index remove --ids` reads it)."),
    images: Path = ImagesOpt,
    html: Path = HtmlOpt,
    overwrite: bool = OverwriteOpt,
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Find groups of near-duplicate items and which one of each group to keep."""
    from ..utils import atomic_write_json
    from .dedup import find_duplicates
    from .images import index_images
    from .searcher import Searcher

    if out is not None:
        check_output_file(out, "dedup result", lambda p: file_has_format(p, DEDUP_FORMAT.split("/")[0]),
                          [index, images], overwrite, option="--out")
    _check_html(html, [index, images], overwrite, "dedup")
    searcher = Searcher.open(index)
    image_source = index_images(index, searcher.manifest, images)
    res = find_duplicates(searcher, threshold=threshold, fraction=fraction, neighbors=neighbors)
    if out is not None:
        from .layout import provenance

        made_from = provenance(index, searcher.version_dir, searcher.manifest)
        atomic_write_json(out, {"format": DEDUP_FORMAT, "index": made_from, **res})
    group_ids = [i for g in res["groups"] for i in g]
    meta = dict(zip(group_ids, searcher.metadata(group_ids)))
    if html is not None:
        from ..pages import render_duplicates

        similarity = {}
        for g in res["groups"]:
            vecs = searcher.vectors_for(g)
            similarity.update(zip(g, (vecs @ vecs[0]).astype(float).tolist()))
        _write_html(html, render_duplicates(res, meta, similarity, image_source, title=f"uniret dedup {index}"))
    keep = set(res["keep"])
    rows = [{"group": gi + 1, "id": i, "keep": i in keep, "path": (meta[i] or {}).get("path"),
             "domain": (meta[i] or {}).get("domain")} for gi, g in enumerate(res["groups"]) for i in g]
    emit(rows, ["group", "id", "keep", "path", "domain"], fmt,
         title=f"{len(res['groups'])} group(s) at similarity >= {res['threshold']:.4f}; {len(res['remove'])} to remove",
         extra={k: v for k, v in res.items()})
