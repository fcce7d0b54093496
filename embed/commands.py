"""CLI: ``uniret model init``, ``uniret model info`` and ``uniret embed``.

torch, timm and open_clip are imported inside the commands so that ``uniret --help`` stays fast.
Several processes: ``torchrun --nproc-per-node N -m uniret.cli embed ...`` (see embed/extract.py).
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path

import typer

from ..cluster import ENGINES, check_engine
from ..data.collection import SPLITS
from ..display import OutputFormat, emit
from ..errors import UniretError, UsageError
from ..guards import claim_output, in_range
from .spec import HELP, ModelSpec

logger = logging.getLogger("uniret")

model_app = typer.Typer(no_args_is_help=True)


class HeadKind(str, Enum):
    linear = "linear"
    none = "none"
    pca = "pca"


class Runtime(str, Enum):
    """What runs the model (see uniret.embed.onnx.resolve_runtime)."""

    torch = "torch"
    onnx = "onnx"
    auto = "auto"


RuntimeOpt = typer.Option(Runtime.auto, "--runtime", help="What runs the model: torch, onnx (ONNX Runtime; "
                          "pip install 'uniret[onnx]') or auto (ONNX Runtime on a CPU when installed and the "
                          "model exports, else torch).")


Engine = Enum("Engine", {name: name for name in ENGINES}, type=str)
Engine.__doc__ = "What runs the job: this machine's processes, or a Ray cluster (uniret.cluster)."

EngineOpt = typer.Option(Engine.local, "--engine", help="local (this machine's processes) or ray (Ray tasks and actors on "
                         "a local Ray or a cluster, retried when a worker dies; pip install 'uniret[ray]').")
RayAddressOpt = typer.Option(None, "--ray-address", help="With --engine ray: auto (the cluster `ray start` made "
                             "here) or HOST:PORT of its head node; default: a local Ray of --workers CPUs.")


class StoreDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


def parse_dims(text: str | None) -> list[int] | None:
    """``"8,16,32,64"`` -> [8, 16, 32, 64]."""
    if not text:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UniretError(f"--nested-dims {text!r}: write comma-separated sizes, e.g. 8,16,32,64") from None


def quiet_open_clip_warnings() -> None:
    """open_clip warns on the root logger that random-init models have no pretrained weights:
    that is what `model init` without --pretrained asks for, so keep it off the terminal."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    for handler in logging.getLogger().handlers:
        handler.addFilter(_Drop())


@model_app.command("init")
def model_init(
    backbone: str = typer.Option(..., "--backbone", help=HELP["backbone"]),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    dim: int = typer.Option(None, "--dim", help=HELP["dim"]),
    head: HeadKind = typer.Option(HeadKind.linear, "--head",
                                  help=HELP["head"]),
    pca_data: Path = typer.Option(None, "--pca-data", help="--head pca: images to fit it on (collection root, packed "
                                                           "store, image folder or shards), e.g. those to be indexed."),
    pca_split: list[str] = typer.Option(None, "--pca-split", help="--head pca on a collection: only these splits."),
    pca_shrink: float = typer.Option(0.1, "--pca-shrink", help="--head pca: add this fraction of the mean "
                                                                "eigenvalue before whitening (0 = full whitening)."),
    nested_dims: str = typer.Option(None, "--nested-dims", help=HELP["nested_dims"]),
    image_size: int = typer.Option(None, "--image-size", help=HELP["image_size"]),
    pool: str = typer.Option(None, "--pool", help=HELP["pool"]),
    crop_pct: float = typer.Option(None, "--crop-pct",
                                   help=HELP["crop_pct"]),
    pretrained: bool = typer.Option(False, "--pretrained", help=HELP["pretrained"]),
    weights: Path = typer.Option(None, "--weights", help=HELP["weights"]),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier model directory at --out."),
) -> None:
    """Make a model directory: an off-the-shelf backbone and a universal head (random linear, none, or PCA)."""
    if dim is not None:
        in_range(dim, "--dim", 1, 65_536)
    in_range(seed, "--seed", 0, 2**63 - 1)
    if image_size is not None:
        in_range(image_size, "--image-size", 8, 4096)
    if (head is HeadKind.pca) != (pca_data is not None):
        raise UsageError("--head pca is fitted on images: pass --pca-data PATH with it (and only with it)")
    if pca_split and pca_data is None:
        raise UsageError("--pca-split goes with --head pca --pca-data PATH")
    inputs = [weights, pca_data] + ([backbone] if Path(backbone).exists() else [])
    items = None
    if pca_data is not None:
        from ..data import open_items

        items = open_items(pca_data, splits=pca_split or None)
    import torch

    from .model import is_model_output

    with claim_output(out, "model directory", is_model_output, inputs=inputs, overwrite=overwrite):
        quiet_open_clip_warnings()
        torch.manual_seed(seed)
        spec = ModelSpec(backbone=backbone, pretrained=pretrained, weights=str(weights) if weights else None,
                         image_size=image_size, pool=pool, crop_pct=crop_pct, dim=dim,
                         nested_dims=parse_dims(nested_dims), head=head.value)
        model = spec.build()
        if items is not None:
            from .pca import fit_pca

            logger.info("fitting PCA-whitening on %d images of %s", len(items), pca_data)
            fit_pca(model, items, shrink=pca_shrink, workers=min(4, os.cpu_count() or 1),
                    describe=str(pca_data) + (f" ({', '.join(pca_split)})" if pca_split else ""))
        provenance = dict(model.config.provenance, seed=seed)
        model.save(out, provenance=provenance)
    logger.info("wrote %s (%s, %s head, %d-d, config hash %s)", out, model.config.backbone, model.config.head,
                model.config.dim, model.config_hash())


@model_app.command("info")
def model_info_command(
    path: Path = typer.Argument(..., help="Model directory."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Show a model directory: backbone, dims, preprocessing, parameters, config hash."""
    from .model import load_model

    quiet_open_clip_warnings()
    model = load_model(path)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    row = {
        "backbone": c.backbone, "head": c.head, "dim": c.dim, "nested_dims": c.nested_dims or "-", "feature_dim": c.feature_dim,
        "input_size": "x".join(str(v) for v in c.preprocess["input_size"][1:]),
        "interpolation": c.preprocess.get("interpolation"), "crop_pct": c.preprocess.get("crop_pct"),
        "parameters": params, "config_hash": model.config_hash(),
    }
    columns = list(row)
    emit([row], columns, fmt, extra={"config": c.to_json()})


def embed_command(
    model: Path = typer.Option(None, "--model", help="Model directory (uniret model init / train); default: the "
                                                     "pretrained EfficientNet-Lite0 when its weights package is installed."),
    data: Path = typer.Option(..., "--data", help="Collection root, packed LMDB, image folder or image file, or "
                                                  "webdataset tar shards ('shards/{00000..00099}.tar')."),
    out: Path = typer.Option(..., "--out", help="Embedding store to write (with --part: a part directory)."),
    domain: list[str] = typer.Option(None, "--domain", help="Only these domains (repeatable)."),
    split: list[str] = typer.Option(None, "--split", help="Only these splits (repeatable)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per batch."),
    workers: int = typer.Option(None, "--workers", help="DataLoader worker processes (default: CPU count, at most 16); with --engine ray: the CPUs of the local "
                                                   "Ray, or how many of the cluster's CPUs to use (default: all)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default auto: a GPU when visible)."),
    dtype: StoreDtype = typer.Option(StoreDtype.float16, "--dtype", help="Stored embedding type."),
    resume: bool = typer.Option(True, "--resume/--restart", help="Continue an interrupted run, or start over."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier store at --out that was made "
                                                              "from other images, model or options."),
    part: str = typer.Option(None, "--part", help="Only slice I of N (0-based, e.g. 3/8) into --out, a part "
                                                  "directory; join the parts with `uniret store merge`."),
    runtime: Runtime = RuntimeOpt,
    engine: Engine = EngineOpt,
    ray_address: str = RayAddressOpt,
    block_rows: int = typer.Option(None, "--block-rows", help="With --engine ray: input rows per store part (the "
                                   "unit of output files and of resume; default 100000; tar input: one part per shard)."),
) -> None:
    """Embed images into a store (row i = item i). Resumable; several GPUs through torchrun (each rank
    writes its own part), several machines through --engine ray (a Ray cluster) or --part I/N and
    `uniret store merge`."""
    from ..data import open_items
    from ..utils import announce_model_load, resolve_device
    from .store.parts import parse_part

    on_ray = check_engine(engine.value, ray_address) == "ray"
    part_spec = parse_part(part)
    if on_ray:
        from .ray_embed import check_device

        check_device(device)
        if part is not None:
            raise UsageError("--engine ray runs every part itself; leave out --part (it is the route without Ray)")
    else:
        resolve_device(device)  # a bad --device (or --part) fails before any image or weight is read
    in_range(batch_size, "--batch-size", 1, 65_536)
    if workers is not None:
        in_range(workers, "--workers", 1 if on_ray else 0, 256)
    if block_rows is not None:
        if not on_ray:
            raise UsageError("--block-rows sets the parts of --engine ray; add --engine ray")
        in_range(block_rows, "--block-rows", 1, 1 << 40)
    unknown = [s for s in split or [] if s not in SPLITS]
    if unknown:
        raise UsageError(f"--split {unknown[0]!r}: splits are {', '.join(SPLITS)}")
    items = open_items(data, domains=domain or None, splits=split or None)
    if model is None:
        from .default import default_model_dir

        model = default_model_dir()
    announce_model_load(model)
    from .extract import embed_items
    from .model import load_model

    quiet_open_clip_warnings()
    embedder = load_model(model)
    # under Ray the actors' device decides the runtime; --device auto may mean GPU actors, so --runtime
    # auto picks ONNX Runtime only for --device cpu there
    if on_ray:
        onnx = _onnx_embedder(model, runtime.value, "cpu" if device == "cpu" else "cuda", load_on="cpu")
    else:
        onnx = _onnx_embedder(model, runtime.value, resolve_device(device))
    if workers is None and not on_ray:
        workers = min(16, os.cpu_count() or 1)
    source = {"path": str(Path(data).resolve()), "domains": list(domain or []), "splits": list(split or [])}
    store = embed_items(embedder, items, out, batch_size=batch_size, workers=workers, device=device,
                        dtype=dtype.value, resume=resume, source=source, overwrite=overwrite, inputs=[data, model],
                        part=part_spec, onnx=onnx, engine=engine.value, ray_address=ray_address,
                        block_rows=block_rows)
    if int(os.environ.get("RANK", "0")) == 0:
        what = f"part {part_spec[0]}/{part_spec[1]} ({_id_range(store.start, store.count)}), " if part_spec[1] > 1 else ""
        logger.info("wrote %s: %s%d x %d %s, %d unreadable", out, what, store.count, store.dim, store.dtype,
                    len(store.failed_ids))


def _onnx_embedder(model: Path, runtime: str, device: str, load_on: str | None = None):
    """The OnnxEmbedder that runs `embed`'s forward pass, or None for torch (see --runtime).
    ``load_on``: the device to load it on here when that is not ``device`` (Ray's actors load the graph
    again on theirs)."""
    from .model import resolve_model_dir
    from .onnx import OnnxEmbedder, load_embedder, resolve_runtime

    if resolve_runtime(runtime, device) != "onnx":
        return None
    embedder = load_embedder(resolve_model_dir(model), "onnx", load_on or device, auto=runtime == "auto")
    return embedder if isinstance(embedder, OnnxEmbedder) else None


store_app = typer.Typer(no_args_is_help=True)


@store_app.command("merge")
def store_merge(
    parts: list[Path] = typer.Argument(..., help="Part directories (uniret embed --part I/N --out DIR).", metavar="PART_DIR..."),
    out: Path = typer.Option(..., "--out", help="The store to write."),
    copy: bool = typer.Option(False, "--copy", help="Copy the part files instead of hard-linking them (another filesystem)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
) -> None:
    """Join part directories into one store (their files are hard-linked, not copied)."""
    from .store.merge import merge_parts

    merge_parts(parts, out, copy=copy, overwrite=overwrite)


@store_app.command("info")
def store_info(
    path: Path = typer.Argument(..., help="An embedding store or part directory."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Show a store's parts: slice, ids, failed images and notes; then its size, model and columns."""
    from .store import EmbeddingStore

    store = EmbeddingStore(path, whole=False)
    rows = [{"part": p.name, "slice": "/".join(map(str, p.slice)), "first_id": p.start, "count": p.count,
             "failed": len(p.failed), "notes": len(p.notes)} for p in store.parts]
    emit(rows, list(rows[0]) if rows else ["part"], fmt,
         title=f"{path}: {store.count} x {store.dim} {store.dtype}, {_id_range(store.start, store.count)}"
               f"{'' if store.manifest.get('complete', True) else ' (a part: merge it with the others)'}; "
               f"model {store.model_hash}; extra columns: {', '.join(store.columns) or '-'}",
         extra={"manifest": store.manifest, "failed": store.failed, "notes": store.notes})


def _id_range(start: int, count: int) -> str:
    return f"ids {start}..{start + count - 1}" if count else "no ids"


class ExportFormat(str, Enum):
    onnx = "onnx"


@model_app.command("export")
def model_export_command(
    path: Path = typer.Argument(..., help="Model directory (or training run directory)."),
    fmt: ExportFormat = typer.Option(..., "--format", help="Export format: onnx."),
    out: Path = typer.Option(..., "--out", help="The graph file to write (e.g. m.onnx); its record goes to OUT.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export at --out."),
) -> None:
    """Export the model as an ONNX graph (dynamic batch; preprocessing recorded in OUT.json), checked
    against the torch model on real images before it is written."""
    from .onnx import export_model

    quiet_open_clip_warnings()
    record = export_model(path, out, overwrite=overwrite)
    logger.info("wrote %s and %s (%s, %d-d, cosine to torch %.6f)", out, f"{out}.json", record["backbone"],
                record["dim"], record["parity_cosine"])
