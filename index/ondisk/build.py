"""``uniret index build --on-disk``: three resumable steps, each one CLI command in the
multi-machine recipe.

1. train (``--train-only``): the Faiss key and the memory plan (:mod:`.budget`); the coarse quantizer
   and codes trained on a sample (on the GPU when Faiss has one); the plan written (:mod:`.shards`);
2. encode (``--encode-part I/N``, or every shard): worker processes encode row ranges of the store
   into IVF shards that share the trained quantizer;
3. merge (``--merge``): the shards' lists become ``lists.ivfdata`` of a new version
   (:mod:`.version`), raw vectors and ids are concatenated, metadata is streamed into LMDB,
   nprobe is tuned against exact search (:mod:`.tune`), the version is published and the
   build directory removed.

Without a step option a build runs all three, resuming from what a killed run left (the trained
quantizer and every complete shard are kept when the store and options are the same).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from ...cluster import check_engine
from ...errors import UniretError, UsageError
from ...guards import claim_output, in_range
from ...utils import git_commit
from .. import gpu as gpu_util
from ..inputs import WORK_DIRS, copy_model, is_own_index, model_to_copy, open_store
from ..keys import KINDS, check_lists, index_key, new_index
from ..layout import FORMAT, is_index_dir, writer_lock
from .budget import DEFAULT_BUDGET, check_workers, fmt_bytes, plan_memory
from .lists import IVFDATA
from .shards import (
    encode_shards,
    iter_items,
    missing_shards,
    part_shards,
    read_plan,
    read_store_rows,
    split_positions,
    store_key,
    write_plan,
    write_valid_rows,
)
from .tune import tune_ondisk
from .vectors import ArrayWriter
from .version import iter_array, merge_version, publish, write_meta

logger = logging.getLogger("uniret")

BUILD_DIR, UPDATE_DIR = WORK_DIRS
ONDISK_KINDS = ("ivf-flat", "ivf-sq8", "ivf-pq")


def ondisk_key(kind: str, n: int, dim: int):
    """(Faiss key, empty index) for ``--kind`` with ``--on-disk``; ``auto`` means ivf-sq8."""
    import faiss

    kind = "ivf-sq8" if kind == "auto" else kind
    if kind in KINDS and kind not in ONDISK_KINDS:
        raise UsageError(f"--on-disk needs an IVF kind: --kind ivf-flat, ivf-sq8 or ivf-pq, not {kind}")
    key = index_key(kind, n, dim)
    index = new_index(key, dim)
    top = faiss.downcast_index(index)
    top = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexPreTransform) else top
    if not isinstance(top, faiss.IndexIVF) or isinstance(top, faiss.IndexIVFPQR):
        raise UsageError(f"--on-disk needs an IVF index whose lists hold every code; {key!r} is not one "
                         "(use --kind ivf-flat, ivf-sq8 or ivf-pq)")
    check_lists(index, n, key)
    return key, index


def _train(store, build: Path, key: str, index, sample: int, seed: int, gpu: str, gpus: int | None):
    """Train ``index`` on ``sample`` of the plan's rows (fp16-rounded, as encoded later)."""
    use_gpu, ngpu = gpu_util.resolve(gpu, gpus)
    rows = np.load(build / "rows.npy", mmap_mode="r")
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), sample, replace=False)) if sample < len(rows) \
        else np.arange(len(rows))
    x = read_store_rows(store, np.asarray(rows[pick])).astype(np.float16).astype(np.float32)
    t0, where = time.perf_counter(), "cpu"
    try:
        if use_gpu and gpu_util.gpu_capable(key):
            try:
                gpu_index = gpu_util.to_gpus(index, ngpu)
                gpu_index.train(x)
                index, where = gpu_util.to_cpu(gpu_index), f"{ngpu} GPU(s)"
            except RuntimeError as exc:
                if gpu == "on":
                    raise
                logger.warning("index: training %s on the GPU failed (%s); training on the CPU", key, exc)
                index = new_index(key, store.dim)
        if not index.is_trained:
            index.train(x)
    except RuntimeError as exc:
        raise UniretError(f"training {key} on {len(x):,} vectors failed: {str(exc).strip().splitlines()[-1]}") from None
    return index, {"rows": int(len(x)), "seconds": round(time.perf_counter() - t0, 3), "on": where}


def ensure_plan(build: Path, store, fingerprint: dict, write_rows, key: str, index, budget: int, workers: int,
                 shard_rows: int | None, seed: int, train=None) -> dict:
    """The plan in ``build`` when it was made with the same ``fingerprint`` (inputs and options); else
    a new one, old work removed. ``write_rows(build) -> n`` writes rows.npy and ids.npy;
    ``train(sample) -> (index, info)`` trains; without it ``index`` is already trained."""
    import faiss

    plan = read_plan(build)
    if plan is not None and plan["fingerprint"] == fingerprint:
        logger.info("index: resuming the build in %s (%d of %d shards done)", build,
                    len(plan["shards"]) - len(missing_shards(build, plan)), len(plan["shards"]))
        return plan
    if build.exists():
        logger.info("index: %s was left by a build of other inputs or options; starting over", build)
        shutil.rmtree(build)
    (build / "shards").mkdir(parents=True)
    n = write_rows(build)
    ivf = faiss.extract_index_ivf(index)
    mem = plan_memory(budget, n, store.dim, ivf.nlist, ivf.code_size, workers, shard_rows)
    info = {"rows": 0, "seconds": 0.0, "on": "reused"}
    if train is not None:
        index, info = train(mem.train_rows)
    plan = {"fingerprint": fingerprint, "key": key, "dim": store.dim, "nlist": int(ivf.nlist),
            "code_size": int(ivf.code_size), "count": n, "store": str(store.path.resolve()),
            "shard_rows": mem.shard_rows, "shards": split_positions(n, mem.shard_rows),
            "memory": mem.to_json(), "train": info, "seed": seed}
    write_plan(build, plan, index)
    trained = f"trained on {info['rows']:,} vectors in {info['seconds']:.0f} s" if train else "the live version's quantizer"
    logger.info("index: %s, %s; %d shard(s) of up to %s rows, %d worker(s), budget %s", key, trained,
                len(plan["shards"]), f"{mem.shard_rows:,}", mem.workers, fmt_bytes(budget))
    return plan


def _step_plan(build: Path, store) -> dict:
    plan = read_plan(build)
    if plan is None:
        raise UniretError(f"{build}: no trained quantizer; run `uniret index build STORE --out INDEX --on-disk "
                          "--train-only` first")
    if plan["fingerprint"]["store"] != store_key(store):
        raise UniretError(f"{build} was planned for another store (or {store.path} changed since); run "
                          "--train-only again")
    return plan


def memory_budget(max_memory: int | None) -> int:
    return DEFAULT_BUDGET if max_memory is None else int(max_memory)


@contextlib.contextmanager
def _claim(root: Path, store, model_dir, overwrite: bool):
    """The index build's output guard (:func:`uniret.guards.claim_output`): a new path, what an
    interrupted build left, or with ``overwrite`` an index that gets a new version; never inside
    the store or the model. A failed first build removes the directory, unless it holds a planned
    on-disk build: re-running resumes it."""
    with claim_output(root, "index directory", is_own_index, inputs=[store.path, model_dir],
                      overwrite=overwrite or not is_index_dir(root)):
        created = not root.exists()
        try:
            with writer_lock(root, create=True):
                yield
        except BaseException:
            if created and read_plan(root / BUILD_DIR) is None:
                shutil.rmtree(root, ignore_errors=True)
            raise


def train_step(store, out, kind: str = "auto", gpu: str = "auto", gpus: int | None = None,
               max_memory: int | None = None, workers: int | None = None, shard_rows: int | None = None,
               seed: int = 0, overwrite: bool = False) -> dict:
    """Step 1: train and plan (kept when a plan of the same inputs is there). Returns the plan."""
    store, root = open_store(store), Path(out)
    workers = check_workers(workers)
    n = int(store.valid_mask.sum())
    if n == 0:
        raise UniretError(f"{store.path} has no usable embeddings; re-embed it")
    key, index = ondisk_key(kind, n, store.dim)
    build = root / BUILD_DIR
    # the rows to index follow from the store (its valid mask), so the store's key covers them
    fingerprint = {"op": "build", "store": store_key(store), "key": key, "seed": seed, "shard_rows": shard_rows}
    with _claim(root, store, None, overwrite):
        return ensure_plan(build, store, fingerprint, lambda b: write_valid_rows(store, b), key, index,
                            memory_budget(max_memory), workers, shard_rows, seed,
                            train=lambda sample: _train(store, build, key, index, sample, seed, gpu, gpus))


def encode_step(store, out, max_memory: int | None = None, workers: int | None = None,
                part: tuple[int, int] | None = None, engine: str = "local", ray_address: str | None = None) -> dict:
    """Step 2: encode the missing shards (of part ``(i, n)`` when given). Needs no lock: several
    machines may encode parts of one build directory at once. ``engine="ray"``: as Ray tasks
    (:mod:`.ray_encode`; ``ray_address`` None for a local Ray of ``workers`` CPUs)."""
    store, build = open_store(store), Path(out) / BUILD_DIR
    plan = _step_plan(build, store)
    return encode_planned(build, store, plan, memory_budget(max_memory), check_workers(workers), part, engine,
                          ray_address, workers)


def encode_planned(build: Path, store, plan: dict, budget: int, workers: int, part: tuple[int, int] | None,
                   engine: str = "local", ray_address: str | None = None, ray_cpus: int | None = None) -> dict:
    """Encode the plan's missing shards (of ``part``): worker processes here, or Ray tasks."""
    shards = list(range(len(plan["shards"]))) if part is None else part_shards(len(plan["shards"]), *part)
    todo = missing_shards(build, plan, shards)
    mem = plan_memory(budget, plan["count"], plan["dim"], plan["nlist"], plan["code_size"], workers, plan["shard_rows"])
    if len(todo) < len(shards):
        logger.info("index: %d of %d shard(s) already encoded; encoding %d", len(shards) - len(todo), len(shards), len(todo))
    t0 = time.perf_counter()
    if engine == "ray":
        from .ray_encode import encode_shards_on_ray

        encode_shards_on_ray(build, store, todo, plan, mem, ray_address, ray_cpus)
    else:
        encode_shards(build, store, todo, mem.workers)
    return {"shards": len(shards), "encoded": len(todo), "workers": mem.workers,
            "seconds": round(time.perf_counter() - t0, 3)}


def merge_step(store, out, max_memory: int | None = None, target_recall: float = 0.95, recall_k: int = 100,
               model_dir=None, tune_sample: int = 1000, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Step 3: merge every shard into a new version and publish it; returns the version directory."""
    store, root = open_store(store), Path(out)
    in_range(target_recall, "--target-recall", 0, 1, low_open=True)
    in_range(recall_k, "--recall-k", 1, 10_000)
    model_dir = model_to_copy(store, model_dir)
    build = root / BUILD_DIR
    with _claim(root, store, model_dir, overwrite):
        plan = _step_plan(build, store)
        missing = missing_shards(build, plan)
        if missing:
            raise UniretError(f"{len(missing)} of {len(plan['shards'])} shards are not encoded yet (first: "
                              f"{missing[:5]}); run --encode-part for their parts (or the build without a step option)")
        t0 = time.perf_counter()
        window = plan_memory(memory_budget(max_memory), plan["count"], plan["dim"], plan["nlist"], plan["code_size"], 1,
                             plan["shard_rows"]).window_bytes
        partial, ivf_bytes = merge_version(root, build, plan, [], window)
        shutil.copyfile(build / "ids.npy", partial / "ids.npy")
        ids = np.load(partial / "ids.npy", mmap_mode="r")
        domains, codes = [], ArrayWriter(partial / "domains.npy", (plan["count"],), np.int32)
        items = (it for _, it in iter_items(store, np.load(build / "rows.npy", mmap_mode="r")))
        write_meta(partial / "meta", zip(iter_array(ids), items), domains, codes)
        codes.close()
        model = store.manifest.get("model") or {}
        manifest = {
            "format": FORMAT, "index_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(), "model": model, "model_dir": copy_model(root, model_dir), "dim": store.dim, "metric": "inner_product",
            "normalized": bool(store.manifest.get("normalized", True)), "kind": plan["key"], "key": plan["key"],
            "search_params": {}, "count": int(plan["count"]), "next_id": int(store.count), "vectors_dtype": "float16",
            "built_on": plan["train"]["on"],
            "on_disk": {"ivfdata": IVFDATA, "ivfdata_bytes": ivf_bytes, "domains": domains, "shards": len(plan["shards"]),
                        "shard_rows": plan["shard_rows"], "memory": plan["memory"], "train": plan["train"],
                        **(extra or {})},
            "history": [{"op": "build", "store": str(store.path.resolve()), "added": int(plan["count"]),
                         "skipped_failed": int(store.count - plan["count"])}],
        }
        recall = tune_ondisk(partial, manifest, ids, recall_k, target_recall, tune_sample, plan["seed"], window)
        manifest.update(recall=recall, search_params={recall["param"]: recall["value"]},
                        build_seconds=round(time.perf_counter() - t0 + (extra or {}).get("encode_seconds", 0)
                                            + plan["train"]["seconds"], 3))
        manifest["on_disk"]["merge_seconds"] = round(time.perf_counter() - t0, 3)
        version = publish(root, partial, manifest)
    shutil.rmtree(build, ignore_errors=True)
    return version


def build_ondisk(store, out, kind: str = "auto", gpu: str = "auto", gpus: int | None = None,
                 max_memory: int | None = None, workers: int | None = None, shard_rows: int | None = None,
                 target_recall: float = 0.95, recall_k: int = 100, model_dir=None, tune_sample: int = 1000,
                 seed: int = 0, overwrite: bool = False, engine: str = "local", ray_address: str | None = None) -> Path:
    """All three steps; a re-run after a kill keeps the trained quantizer and the shards written.
    ``engine="ray"`` encodes the shards as Ray tasks (train and merge stay here)."""
    check_engine(engine, ray_address)
    store = open_store(store)
    in_range(target_recall, "--target-recall", 0, 1, low_open=True)
    in_range(recall_k, "--recall-k", 1, 10_000)
    model_to_copy(store, model_dir)  # a wrong --model fails before hours of work
    train_step(store, out, kind, gpu, gpus, max_memory, workers, shard_rows, seed, overwrite)
    encoded = encode_step(store, out, max_memory, workers, engine=engine, ray_address=ray_address)
    return merge_step(store, out, max_memory, target_recall, recall_k, model_dir, tune_sample,
                      extra={"workers": encoded["workers"], "encode_seconds": encoded["seconds"]}, overwrite=overwrite)


def check_step_options(on_disk: bool, train_only: bool, encode_part: str | None, merge: bool,
                       kind: str) -> tuple[str | None, tuple[int, int] | None]:
    """The CLI's step options -> (step, part); one-line errors for combinations that do not fit."""
    steps = [name for name, on in (("--train-only", train_only), ("--encode-part", encode_part is not None),
                                   ("--merge", merge)) if on]
    if steps and not on_disk:
        raise UsageError(f"{steps[0]} is a step of an on-disk build; add --on-disk")
    if len(steps) > 1:
        raise UsageError(f"{' and '.join(steps)} are separate steps; give one of them")
    if on_disk and kind in KINDS and kind not in ONDISK_KINDS + ("auto",):
        raise UsageError(f"--on-disk needs an IVF kind: --kind ivf-flat, ivf-sq8 or ivf-pq, not {kind}")
    part = None
    if encode_part is not None:
        i, sep, n = encode_part.partition("/")
        if not (sep and i.strip().isdigit() and n.strip().isdigit() and int(i) < int(n)):
            raise UsageError(f"--encode-part {encode_part!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        part = (int(i), int(n))
    step = "train" if train_only else "encode" if part else "merge" if merge else None
    return step, part
