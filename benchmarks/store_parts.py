"""What parts cost: listing webdataset shards (what a part reads to find its first id) and merging
parts (hard links, so independent of the vectors' size).

    python benchmarks/store_parts.py --shards 20 --per-shard 1000 --parts 8 --rows 250000

Prints (1) samples/s of a full listing (tar headers + the .json/.txt side files) and of a header-only
count, with the bytes each reads against the shards' size; (2) `store merge` seconds for ``--parts``
parts of ``--rows`` x 64 fp16 rows each, against copying the same embeddings files.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def write_shards(root: Path, shards: int, per_shard: int, image_bytes: int) -> list[Path]:
    """img2dataset-like shards: key.jpg (random bytes of a typical thumbnail size), key.json, key.txt."""
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, image_bytes, dtype=np.uint8).tobytes()
    paths = []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                for ext, data in (("jpg", blob), ("json", json.dumps({"url": f"https://x/{key}", "key": key}).encode()),
                                  ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def bench_listing(paths: list[Path]) -> dict:
    from uniret.data.webdataset import list_shard

    size = sum(p.stat().st_size for p in paths)
    out = {}
    for name, side in (("full listing", True), ("header-only count", False)):
        t0 = time.perf_counter()
        n = sum(len(list_shard(p, p.name, read_side=side).keys) for p in paths)
        seconds = time.perf_counter() - t0
        out[name] = {"samples": n, "seconds": round(seconds, 3), "samples_per_s": round(n / seconds)}
    out["shard_bytes"] = size
    return out


def bench_merge(work: Path, parts: int, rows: int, dim: int = 64) -> dict:
    from uniret.data.collection import Item, ItemList
    from uniret.embed.store import part_name
    from uniret.embed.store.merge import merge_parts
    from uniret.embed.store.writer import PartWriter, write_manifest

    items = ItemList([Item(f"{i}.jpg", position=i) for i in range(parts * rows)])
    header = {"model_hash": "bench", "source_key": "bench", "total": len(items)}
    dirs = []
    for k in range(parts):
        part = items.part(k, parts)
        w = PartWriter(work / f"p{k}" / "parts" / part_name(k, parts), part, k, parts, dim, "float16", header)
        w.write(np.arange(len(part)), np.ones((len(part), dim), np.float32))
        w.checkpoint(np.arange(len(part)))
        entry = w.finish()
        write_manifest(work / f"p{k}", [entry], dim, "float16", {"config_hash": "bench"}, {}, "bench", len(items), {})
        dirs.append(work / f"p{k}")
    t0 = time.perf_counter()
    merge_parts(dirs, work / "merged")
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k, d in enumerate(dirs):
        shutil.copy(d / "parts" / part_name(k, parts) / "embeddings.npy", work / f"copy{k}.npy")
    copy_s = time.perf_counter() - t0
    return {"parts": parts, "rows": parts * rows, "vector_bytes": parts * rows * dim * 2,
            "merge_seconds": round(merge_s, 3), "copy_seconds": round(copy_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--image-bytes", type=int, default=20_000, help="bytes per image member")
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=250_000, help="rows per part")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "shards").mkdir()
        listing = bench_listing(write_shards(work / "shards", args.shards, args.per_shard, args.image_bytes))
        merge = bench_merge(work, args.parts, args.rows)
    print(json.dumps({"listing": listing, "merge": merge}, indent=2))
    full, heads = listing["full listing"], listing["header-only count"]
    print(f"listing: {full['samples_per_s']:,} samples/s full, {heads['samples_per_s']:,} samples/s header-only; "
          f"merge of {merge['rows']:,} rows: {merge['merge_seconds']} s vs {merge['copy_seconds']} s to copy the "
          f"vectors (ratio {merge['copy_seconds'] / max(merge['merge_seconds'], 1e-9):.1f}x)")


if __name__ == "__main__":
    main()
