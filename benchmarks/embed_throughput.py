"""Embedding throughput: how close does extraction get to the model's compute limit?

Measures, in one run on one machine, for each backbone and image size:

  (a) compute: the model (backbone + universal head) on pre-loaded device tensors, with the same
      precision path as extraction (inference_mode; bf16/fp16 autocast + channels_last on CUDA);
  (b) end-to-end: ``embed_items`` (the code path of ``uniret embed``) from a packed LMDB: read
      bytes, decode, preprocess in DataLoader workers, pinned memory, model, writes to the store.
      Worker start-up is included; model loading is not.

It prints images/s for both and the ratio b/a. Target (issue 3): >= 0.85 on one H100 with 16
workers for ViT-S/16 and ViT-B/16 at 224 px. Without --data it makes the demo collection and packs
it; the N images of (b) cycle through the store's images.

    python benchmarks/embed_throughput.py --backbone timm:vit_small_patch16_224 --image-size 64 224
    python benchmarks/embed_throughput.py --device cuda --workers 16 --batch-size 256 --images 20000 \
        --backbone timm:vit_small_patch16_224 timm:vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path


def compute_throughput(model, device, batch_size: int, images: int, warmup: int = 2) -> float:
    """Images/s of the model alone on a batch that already lives on the device."""
    import torch

    size = model.config.preprocess["input_size"]
    x = torch.randn(batch_size, *size, device=device)
    cuda = device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast("cuda", dtype=amp) if cuda else nullcontext()
    steps = max(1, images // batch_size)
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return steps * batch_size / seconds


def end_to_end_throughput(model, items, out: Path, device, batch_size: int, workers: int) -> float:
    """Images/s of the extraction pipeline writing a fresh store."""
    from uniret.embed.extract import embed_items

    start = time.perf_counter()
    embed_items(model, items, out, batch_size=batch_size, workers=workers, device=device, resume=False)
    return len(items) / (time.perf_counter() - start)


def cycled_items(source, n: int):
    """``n`` items cycling through ``source`` (ids stay distinct rows of the store)."""
    from uniret.data.collection import ItemList

    base = list(source.items)
    return ItemList([base[i % len(base)] for i in range(n)], source=source.source, base=source.base)


def packed_demo(workdir: Path) -> Path:
    from uniret.data.demo import make_demo
    from uniret.data.store import pack

    root = workdir / "demo"
    make_demo(root, seed=0, scale=1.0)
    out = workdir / "demo.lmdb"
    pack(root, out)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from uniret.utils import resolve_device

    device = torch.device(resolve_device(args.device))
    workdir = Path(tempfile.mkdtemp(prefix="uniret-bench-"))
    try:
        return measure(args, device, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, device, workdir: Path) -> list[dict]:
    import torch

    from uniret.data import open_items
    from uniret.embed.model import build_model

    data = Path(args.data) if args.data else packed_demo(workdir)
    items = cycled_items(open_items(data), args.images)
    rows = []
    for backbone in args.backbone:
        for size in args.image_size:
            torch.manual_seed(0)
            model = build_model(backbone, dim=64, image_size=size).to(device).eval()
            a = compute_throughput(model, device, args.batch_size, args.images)
            b = end_to_end_throughput(model, items, workdir / "store", device, args.batch_size, args.workers)
            row = {"backbone": backbone, "image_size": size, "device": str(device), "images": len(items),
                   "batch_size": args.batch_size, "workers": args.workers,
                   "compute_img_s": round(a, 1), "end_to_end_img_s": round(b, 1), "ratio": round(b / a, 3)}
            rows.append(row)
            print(f"{backbone} @{size}px on {device}: compute {a:.1f} img/s, end-to-end {b:.1f} img/s, "
                  f"ratio {b / a:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", nargs="+", default=["timm:vit_small_patch16_224"])
    p.add_argument("--image-size", nargs="+", type=int, default=[224])
    p.add_argument("--images", type=int, default=512, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when visible)")
    p.add_argument("--data", default=None, help="packed LMDB to read (default: the packed demo collection)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
