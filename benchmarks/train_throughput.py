"""Training throughput: udon vs uscrr vs the backbone's forward+backward alone, in one run.

Same backbone, batch and device for all three; synthetic single-domain batches (data loading is
excluded: this measures what the method adds on top of the backbone). Each timed round runs the
three variants in turn, so slow drifts of a shared machine hit all of them alike; the median step
time over rounds gives images/s, and the ratios are printed:

    udon / uscrr      target >= 0.90
    udon / backbone   target >= 0.70

Runs unchanged on CUDA (bf16 autocast, synchronised timing) and on the CPU:

    python benchmarks/train_throughput.py --backbone timm:resnet18 --image-size 64 --batch-size 32
    python benchmarks/train_throughput.py --backbone timm:vit_base_patch16_224 --batch-size 128  # H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(method: str, args, num_classes: list[int], device: torch.device):
    from uniret.train.config import TrainConfig
    from uniret.train.methods import METHODS
    from uniret.train.model import TrainingModel
    from uniret.train.optim import make_optimizer
    from uniret.train.setup import build_embedder

    torch.manual_seed(0)
    config = TrainConfig(data="-", out="-", method=method, backbone=args.backbone, image_size=args.image_size,
                         batch_size=args.batch_size, backbone_freeze_fraction=0.0)
    model = TrainingModel(build_embedder(config), METHODS[method](config, num_classes)).to(device).train()
    optimizer = make_optimizer(model, config)
    for p in model.parameters():  # absent_heads="update", the default: every head is stepped
        p.grad = torch.zeros_like(p)
    return config, model, optimizer


def make_steps(args, device: torch.device):
    from uniret.train.trainer import method_losses

    num_classes = [args.classes] * args.domains
    autocast = device.type == "cuda"
    steps = {}
    for method in ("udon", "uscrr"):
        _, model, optimizer = build(method, args, num_classes, device)

        def step(images, labels, domain, model=model, optimizer=optimizer):
            losses = method_losses(model, images, labels, domain, None, autocast)
            optimizer.zero_grad(set_to_none=False)
            losses["loss"].backward()
            optimizer.step()

        steps[method] = step
    _, model, _ = build("uscrr", args, num_classes, device)
    backbone = model.embedder.backbone
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-5, weight_decay=1e-6)

    def backbone_step(images, labels, domain):
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False):
            features = backbone(images)
        optimizer.zero_grad(set_to_none=False)
        features.float().pow(2).mean().backward()
        optimizer.step()

    steps["backbone"] = backbone_step
    return steps, model.embedder.config.preprocess["input_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="timm:resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--classes", type=int, default=1000, help="classes per domain")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    steps, input_size = make_steps(args, device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, *input_size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in steps.values():
        for i in range(args.warmup):
            fn(images, labels, i % args.domains)
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            for i in range(args.steps):
                fn(images, labels, i % args.domains)  # round-robin domains, as training would
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    ips = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "backbone": args.backbone, "image_size": input_size[-1], "batch_size": args.batch_size,
        "domains": args.domains, "classes_per_domain": args.classes,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "udon/uscrr": round(ips["udon"] / ips["uscrr"], 3),
        "udon/backbone": round(ips["udon"] / ips["backbone"], 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']}  backbone {args.backbone} @ {input_size[-1]} px  batch {args.batch_size}  "
          f"{args.domains} domains x {args.classes} classes")
    for name, v in ips.items():
        print(f"  {name:9s} {v:9.1f} images/s")
    print(f"  udon/uscrr    {result['udon/uscrr']:.3f}  (target >= 0.90)")
    print(f"  udon/backbone {result['udon/backbone']:.3f}  (target >= 0.70)")


if __name__ == "__main__":
    main()
