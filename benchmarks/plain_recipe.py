"""The plain recipe of issue #13, re-implemented as the baseline uniret's CPU recipe must beat.

A 6-conv BN-ReLU CNN (1.1M parameters) at 64 px, one joint cosine classifier over the classes of
every domain (normalised softmax, scale 16) on a 64-d L2-normalised embedding, single-domain
batches of 128 with the domain drawn uniformly, random-resized crop scale 0.6-1 and colour jitter
0.2 (timm's ``create_transform``), no flips, AdamW lr 1e-3 with weight decay 5e-4 and a cosine
decay over the run, trained for a wall-clock budget; no validation, no model selection. The test
split is then evaluated once, exactly like ``uniret eval`` (merged protocol, the model wrapped as a
``UniversalEmbedder``, same code path and report files):

    python benchmarks/plain_recipe.py --data bench64.lmdb --out plain --minutes 15 --threads 1

Prints and writes ``OUT/summary.json`` (steps, images, wall seconds, the merged mean metrics); the
report is ``OUT/report``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def plain_cnn() -> nn.Sequential:
    """6 x (3x3 conv, BN, ReLU), max-pooling between stages, global average pool: 1.13M parameters."""
    widths = [(3, 32), (32, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    pool_after = {0, 1, 3, 4}  # 64 -> 32 -> 16 -> 16 -> 8 -> 4 px
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if i in pool_after:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def build(image_size: int, dim: int):
    """The plain CNN as a uniret UniversalEmbedder (so ``uniret eval``'s code evaluates it)."""
    from uniret.embed.backbones import Backbone
    from uniret.embed.model import ModelConfig, UniversalEmbedder

    preprocess = {"input_size": [3, image_size, image_size], "interpolation": "bicubic", "crop_pct": 1.0, **IMAGENET}
    backbone = Backbone("plain:cnn6", plain_cnn(), 256, preprocess)
    config = ModelConfig(backbone="plain:cnn6", dim=dim, feature_dim=256, preprocess=preprocess)
    return UniversalEmbedder(backbone, config)


class TrainSet:
    """Every train image of every domain, labels offset into one joint label space."""

    def __init__(self, data: str, image_size: int):
        from timm.data import create_transform

        from uniret.data import open_collection

        collection = open_collection(data)
        self.domains = [d for d in collection.domains if collection.has_split(d, "train")]
        self.items = collection.items(domains=self.domains, splits=["train"])
        self.by_domain, labels, offset = [], [], 0
        for d in self.domains:
            records = collection.records(d, "train")
            start = len(labels)
            labels += [r.class_id + offset for r in records]
            self.by_domain.append(np.arange(start, len(labels)))
            offset += max(r.class_id for r in records) + 1
        self.labels, self.num_classes = np.array(labels), offset
        self.transform = create_transform(image_size, is_training=True, scale=(0.6, 1.0), hflip=0.0, vflip=0.0,
                                          color_jitter=0.2, interpolation="bicubic", re_prob=0.0, **IMAGENET)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from uniret.data.images import decode_image

        images = [self.transform(decode_image(self.items.get_image_bytes(int(i)))) for i in rows]
        return torch.stack(images), torch.as_tensor(self.labels[rows])


def train(args) -> tuple[object, dict]:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = TrainSet(args.data, args.image_size)
    model = build(args.image_size, args.dim).train()
    prototypes = nn.Parameter(torch.randn(data.num_classes, args.dim) / args.dim ** 0.5)
    optimizer = torch.optim.AdamW([*model.parameters(), prototypes], lr=args.lr, weight_decay=args.weight_decay)
    budget, spent, steps, log = 60.0 * args.minutes, 0.0, 0, []
    while spent < budget:
        started = time.perf_counter()
        lr = 0.5 * args.lr * (1 + np.cos(np.pi * spent / budget))  # cosine decay over the wall-clock budget
        for group in optimizer.param_groups:
            group["lr"] = lr
        domain = int(rng.integers(len(data.domains)))
        images, labels = data.batch(rng.choice(data.by_domain[domain], args.batch_size))
        cosines = model(images) @ F.normalize(prototypes, dim=1).T
        loss = F.cross_entropy(16.0 * cosines, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        spent += time.perf_counter() - started
        if steps % 50 == 0:
            log.append({"step": steps, "loss": loss.item(), "lr": lr, "seconds": round(spent, 1)})
            print(json.dumps(log[-1]), flush=True)
    return model.eval(), {"steps": steps, "images": steps * args.batch_size, "train_seconds": round(spent, 1),
                          "log": log}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="packed LMDB store (or collection root)")
    p.add_argument("--out", required=True, help="folder for the report and summary.json")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from uniret.eval.run import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, summary = train(args)
    started = time.perf_counter()
    report = evaluate(None, args.data, split="test", protocol="merged", out=out / "report", device="cpu",
                      batch_size=256, model=model)
    summary.update(settings=vars(args), parameters=sum(p.numel() for p in model.backbone.parameters()),
                   eval_seconds=round(time.perf_counter() - started, 1), merged=report["results"]["merged"]["mean"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("steps", "train_seconds", "merged")}))
    return summary


if __name__ == "__main__":
    main()
