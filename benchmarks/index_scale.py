"""Scale benchmark of the on-disk IVF index (issue 14): 1M and 10M x 64 clustered synthetic vectors.

For each size a real embedding store is written chunk by chunk (fp32, never held in RAM) and 1,000
queries are drawn separately from the same distribution; their exact top-k over the stored vectors
(fp16-rounded, as the index holds them) is computed block by block. The index is then built with
the three step commands of the multi-machine recipe, each one ``uniret index build --on-disk``
process:

  train   ``--train-only``        quantizer and codes trained on a sample, the shard plan
  encode  ``--encode-part 0/1``   every shard, with ``--workers`` processes
  merge   ``--merge``             lists.ivfdata, raw vectors, metadata, nprobe tuning, publish

Per step it records the wall time, the CPU time (the step's worker processes included: on a CPU
shared with other jobs it is the steadier figure) and the peak RSS, sampled every 0.1 s: of the
largest single process (VmHWM) and of the whole process tree (VmRSS summed). Search runs in a process of its own with one Faiss thread:
the queries one at a time through ``Searcher.search``, a first pass (lists read from disk: the build
drops what it writes from the page cache) and a second, warm one; QPS, recall@k against the exact
top-k, and the process's peak RSS.

    python benchmarks/index_scale.py                         # 1M and 10M, ivf-sq8 (about an hour)
    python benchmarks/index_scale.py --sizes 1000000 --kinds ivf-flat ivf-sq8
    python benchmarks/index_scale.py --sizes 100000 --workdir /tmp/scale     # a quick check

Targets (issue 14): the 10M build's peak RSS <= 3 GB; recall@100 >= 0.9 at >= 100 QPS single-threaded;
the 10M/1M build-time ratio is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 1 << 18

SEARCH_CHILD = """
import json, sys, time
import faiss
import numpy as np
from uniret.index.keys import recall_at_k
from uniret.index.searcher import Searcher

faiss.omp_set_num_threads(1)
index, queries, truth, k = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
s = Searcher.open(index, gpu="off", device="cpu")
out = {"open_s": round(time.perf_counter() - t0, 3), "key": s.key, "search_params": s.search_params}
for name in ("cold", "warm"):
    found = np.empty((len(queries), k), dtype=np.int64)
    t0 = time.perf_counter()
    for i, q in enumerate(queries):
        found[i] = s.search(q[None], k)[1][0]
    out[name + "_qps"] = round(len(queries) / (time.perf_counter() - t0), 1)
    out[name + "_recall"] = round(recall_at_k(found, truth), 4)
out["peak_rss"] = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps(out))
"""


def clustered_chunks(n: int, dim: int, clusters: int, noise: float, seed: int, stream: int = 0):
    """Unit vectors around ``clusters`` Gaussian centres (drawn from ``seed``), yielded CHUNK rows at
    a time; chunk c of ``stream`` uses its own generator, so the data do not depend on how much is
    held at once, and another stream (the queries) samples the same clusters afresh."""
    centers = np.random.default_rng(seed).normal(size=(clusters, dim)).astype(np.float32)
    for c, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, stream, c])
        m = min(CHUNK, n - start)
        x = centers[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, dim)).astype(np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(path: Path, n: int, dim: int, clusters: int, noise: float, seed: int) -> None:
    """A one-part store in the single-directory layout (format 1, which every reader still opens),
    written row chunk by row chunk: writers of the parted format take the items as a list (reused
    when it is there)."""
    from uniret.data.collection import Item
    from uniret.embed.store import EmbeddingStore
    from uniret.embed.store.layout import FORMAT_V1

    source = {"synthetic": {"n": n, "dim": dim, "clusters": clusters, "noise": noise, "seed": seed, "version": 2}}
    if (path / "manifest.json").is_file() and json.loads((path / "manifest.json").read_text()).get("source") == source:
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "embeddings.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for x in clustered_chunks(n, dim, clusters, noise, seed):
            f.write(x.astype(np.float32).tobytes())
    with open(tmp / "metadata.jsonl", "w") as f:
        for i in range(n):
            item = Item(path=f"{i:09d}.jpg", domain="synthetic", split="index", position=i)
            f.write(json.dumps({"id": i, **item.to_json()}) + "\n")
    manifest = {"format": FORMAT_V1, "dim": dim, "count": n, "dtype": "float32", "normalized": True,
                "model": {"config_hash": "benchmark", "backbone": "synthetic"}, "source": source, "failed": {}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    EmbeddingStore(path).embeddings  # noqa: B018 - validates shape against the manifest


def ground_truth(store: Path, queries: np.ndarray, k: int, out: Path) -> np.ndarray:
    """Exact top-k rows of ``queries`` over the fp16-rounded store vectors, block by block."""
    import faiss

    if out.is_file():
        return np.load(out)
    arr = np.load(store / "embeddings.npy", mmap_mode="r")
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(arr), 1 << 20):
        xb = np.array(arr[start:start + (1 << 20)]).astype(np.float16).astype(np.float32)
        scores, rows = faiss.knn(queries, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, rows + start)
    heap.finalize()
    np.save(out, heap.I)
    return heap.I


def _tree_rss(root: int, hwm: dict[int, int]) -> int:
    """VmRSS summed over ``root`` and its descendants (bytes); records each one's VmHWM in ``hwm``.

    VmHWM is the peak RSS of a process since its exec. (``ru_maxrss`` of a child is not: Linux
    carries the parent's peak across fork and exec into it.)"""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(frontier)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        hwm[pid] = max(hwm.get(pid, 0), int(fields.get("VmHWM", "0 kB").split()[0]) * 1024)
    return total


def run_measured(argv: list[str]) -> dict:
    """Run a command; wall time, CPU time (user + system, its worker processes included), the peak
    RSS of its largest process (VmHWM) and of its whole process tree (VmRSS summed), both sampled
    every 0.1 s."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        peak, hwm, done = [0], {}, threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(proc.pid, hwm))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # its rusage holds the CPU time of the whole tree
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_process": max(hwm.values(), default=0), "peak_rss_tree": peak[0], "stdout": stdout,
            "stderr": stderr}


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--kinds", nargs="+", default=["ivf-sq8"])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--max-memory", default="3G")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("scale-bench"), help="stores, queries and indexes (GBs at 10M)")
    ap.add_argument("--keep-index", action="store_true", help="keep the index directories")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "uniret.cli"]
    results = []
    for n in args.sizes:
        t0 = time.perf_counter()
        store = args.workdir / f"store-{n}x{args.dim}"
        write_store(store, n, args.dim, args.clusters, args.noise, seed=0)
        queries = next(clustered_chunks(args.queries, args.dim, args.clusters, args.noise, seed=0, stream=1))
        np.save(args.workdir / "queries.npy", queries)
        tag = hashlib.sha256(queries.tobytes()).hexdigest()[:12]
        truth = ground_truth(store, queries, args.k, args.workdir / f"truth-{n}x{args.dim}-k{args.k}-{tag}.npy")
        np.save(args.workdir / "truth.npy", truth)
        prep_s = time.perf_counter() - t0
        for kind in args.kinds:
            index = args.workdir / f"index-{n}-{kind}"
            shutil.rmtree(index, ignore_errors=True)
            build = [*cli, "index", "build", str(store), "--out", str(index), "--on-disk", "--kind", kind,
                     "--max-memory", args.max_memory, "--workers", str(args.workers),
                     "--target-recall", str(args.target_recall), "--recall-k", str(args.k)]
            load = [os.getloadavg()[0]]
            steps = {name: run_measured(build + flag) for name, flag in
                     (("train", ["--train-only"]), ("encode", ["--encode-part", "0/1"]), ("merge", ["--merge"]))}
            load.append(os.getloadavg()[0])
            search = run_measured([sys.executable, "-c", SEARCH_CHILD, str(index),
                                   str(args.workdir / "queries.npy"), str(args.workdir / "truth.npy"), str(args.k)])
            found = json.loads(search["stdout"].strip().splitlines()[-1])
            manifest = json.loads((index / (index / "CURRENT").read_text().strip() / "manifest.json").read_text())
            row = {
                "n": n, "dim": args.dim, "kind": kind, "key": manifest["key"],
                "search_params": manifest["search_params"], "max_memory": args.max_memory, "workers": args.workers,
                "shards": manifest["on_disk"]["shards"], "lists_bytes": manifest["on_disk"]["ivfdata_bytes"],
                "build_seconds": round(sum(s["seconds"] for s in steps.values()), 1),
                "steps": {k: {f: v for f, v in s.items() if f not in ("stdout", "stderr")} for k, s in steps.items()},
                "build_peak_rss_process": max(s["peak_rss_process"] for s in steps.values()),
                "build_peak_rss_tree": max(s["peak_rss_tree"] for s in steps.values()),
                "search": found, "search_peak_rss": found["peak_rss"], "recall_at_build": manifest["recall"]["recall"],
                "loadavg_1min": load, "data_seconds": round(prep_s, 1), "cpus": os.cpu_count(),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep_index:
                shutil.rmtree(index, ignore_errors=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n| vectors | kind (key, nprobe) | build s (train/encode/merge) | build peak RSS GiB (process / tree) "
          f"| search QPS 1 thread (cold / warm) | recall@{args.k} | search peak RSS GiB | lists GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        st = r["steps"]
        print(f"| {r['n']:,} x {r['dim']} | {r['kind']} ({r['key']}, {r['search_params']}) | {r['build_seconds']:.0f} "
              f"({st['train']['seconds']:.0f}/{st['encode']['seconds']:.0f}/{st['merge']['seconds']:.0f}) "
              f"| {gib(r['build_peak_rss_process'])} / {gib(r['build_peak_rss_tree'])} "
              f"| {r['search']['cold_qps']:.0f} / {r['search']['warm_qps']:.0f} | {r['search']['warm_recall']:.3f} "
              f"| {gib(r['search_peak_rss'])} | {gib(r['lists_bytes'])} |")
    by_kind = {}
    for r in results:
        by_kind.setdefault(r["kind"], {})[r["n"]] = r["build_seconds"]
    for kind, times in by_kind.items():
        if len(times) > 1:
            small, large = min(times), max(times)
            print(f"{kind}: build time {large:,} / {small:,} vectors = {times[large] / times[small]:.1f}x "
                  f"for {large / small:.0f}x the vectors")
    return results


if __name__ == "__main__":
    main()
