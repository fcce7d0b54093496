"""CLI: ``uniret train`` -- UDON and its baselines on a collection (folder or packed LMDB).

Options left out fall back to ``--config FILE`` and then to the reference recipe
(:class:`uniret.train.config.TrainConfig`). The model options are those of ``uniret model init``.
``--method`` and ``--sampler`` list the registries of :mod:`uniret.train.methods` and
:mod:`uniret.train.samplers` (neither imports torch). Several GPUs: ``torchrun --nproc_per_node N -m
uniret.cli train ...`` (the global ``--batch-size`` is split over the processes).
"""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from ..embed.spec import HELP
from .methods import METHODS
from .samplers import SAMPLERS

MethodName = enum.Enum("MethodName", {name: name for name in METHODS}, type=str)
SamplerName = enum.Enum("SamplerName", {name: name for name in SAMPLERS}, type=str)
ScheduleName = enum.Enum("ScheduleName", {name: name for name in ("constant", "cosine", "step")}, type=str)

_METHOD_HELP = "; ".join(f"{n}: {cls.help} (default sampler {cls.default_sampler})" for n, cls in METHODS.items())
_SAMPLER_HELP = "; ".join(f"{n}: {cls.help}" for n, cls in SAMPLERS.items())


def _value(option):
    return option.value if isinstance(option, enum.Enum) else option


def train_command(
    data: str = typer.Option(None, "--data", help="Collection root or packed LMDB directory."),
    method: MethodName = typer.Option(None, "--method", help=f"Training method (default udon). {_METHOD_HELP}."),
    domain: str = typer.Option(None, "--domain", help="The one domain of --method specialist."),
    sampler: SamplerName = typer.Option(None, "--sampler", help=f"Domain of each step (default: the method's). {_SAMPLER_HELP}."),
    backbone: str = typer.Option(None, "--backbone", help=HELP["backbone"]),
    image_size: int = typer.Option(None, "--image-size", help=HELP["image_size"]),
    pool: str = typer.Option(None, "--pool", help=HELP["pool"]),
    crop_pct: float = typer.Option(None, "--crop-pct", help=HELP["crop_pct"]),
    dim: int = typer.Option(None, "--dim", help=HELP["dim"]),
    nested_dims: str = typer.Option(None, "--nested-dims",
                                    help=HELP["nested_dims"]),
    pretrained: bool = typer.Option(None, "--pretrained/--no-pretrained", help=HELP["pretrained"]),
    weights: str = typer.Option(None, "--weights", help=HELP["weights"]),
    freeze_backbone: bool = typer.Option(None, "--freeze-backbone/--no-freeze-backbone",
                                         help="Train the heads only: the backbone's features are computed once per "
                                              "image and view and cached."),
    train_blocks: int = typer.Option(None, "--train-blocks", help="Train only the last N stages of the backbone; "
                                                                  "the output of the frozen rest is cached."),
    cache_views: int = typer.Option(None, "--cache-views", help="Augmented views of each image for a frozen part "
                                                                "(default 4)."),
    feature_cache: str = typer.Option(None, "--feature-cache", help="Where to cache a frozen part's outputs "
                                                                    "(default: the uniret cache; keyed by content)."),
    cache_features: bool = typer.Option(None, "--cache-features/--no-cache-features",
                                        help="With a frozen part: cache its outputs (default) or run it in the loop."),
    distill_backbone: bool = typer.Option(None, "--distill-backbone/--no-distill-backbone",
                                          help="udon: let L_log and L_rel train the backbone (default) or stop them at e_b."),
    steps: int = typer.Option(None, "--steps", help="Training steps (one single-domain batch each)."),
    time_budget: float = typer.Option(None, "--time-budget", metavar="MINUTES",
                                      help="Train for this many minutes instead of --steps; schedules stretch to it."),
    head_lr: float = typer.Option(None, "--head-lr", help="Learning rate of the heads and classifiers (default 1e-3)."),
    backbone_lr: float = typer.Option(None, "--backbone-lr", help="Learning rate of the backbone (default 1e-5)."),
    lr_schedule: ScheduleName = typer.Option(None, "--lr-schedule", help="Learning-rate schedule of each group (default constant)."),
    warmup_fraction: float = typer.Option(None, "--warmup-fraction", help="Linear warm-up over this fraction of each group's span (default 0)."),
    grad_clip_norm: float = typer.Option(None, "--grad-clip-norm", help="Clip the global gradient norm (default: no clipping)."),
    ema_decay: float = typer.Option(None, "--ema-decay", help="EMA of the weights, e.g. 0.999; validated and exported (default off)."),
    augment: str = typer.Option(None, "--augment", metavar="JSON",
                                help='Augmentation spec of every domain, e.g. \'{"crop": "rrc", "scale": [0.35, 1], "hflip": 0}\' (per domain: augment_domains in --config).'),
    batch_size: int = typer.Option(None, "--batch-size", help="Global batch size (default 128)."),
    out: str = typer.Option(None, "--out", help="Run directory to create (or to continue with --resume)."),
    config: Path = typer.Option(None, "--config", help="JSON file of training options (TrainConfig fields)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default 0)."),
    val_every: int = typer.Option(None, "--val-every", help="Validate every N steps (0 = never) (default 1000)."),
    ckpt_every: int = typer.Option(None, "--ckpt-every", help="Checkpoint every N steps (default 1000)."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default auto)."),
    workers: int = typer.Option(None, "--workers", help="Image-decoding processes (default 0)."),
) -> None:
    """Train a universal embedding (UDON or a baseline); writes RUN/ with the exported RUN/model."""
    import logging

    from ..errors import UsageError
    from ..safeio import BadFile, parse_json
    from .config import resolve_config
    from .trainer import train

    nested = None
    if nested_dims:
        try:
            nested = [int(v) for v in nested_dims.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--nested-dims takes comma-separated integers, not {nested_dims!r}") from None

    augment_spec = None
    if augment:
        try:
            augment_spec = parse_json(augment, "--augment", "augmentation spec")
        except BadFile as exc:
            raise UsageError(f"--augment takes a JSON object ({str(exc).split(': ', 1)[1].split(';')[0]}), "
                             "e.g. '{\"hflip\": 0}'") from None

    cfg = resolve_config(
        config, data=data, method=_value(method), domain=domain, sampler=_value(sampler), backbone=backbone,
        image_size=image_size, pool=pool, crop_pct=crop_pct, dim=dim, nested_dims=nested, pretrained=pretrained,
        weights=weights, freeze_backbone=freeze_backbone, train_blocks=train_blocks, cache_views=cache_views,
        feature_cache=feature_cache, cache_features=cache_features, distill_to_backbone=distill_backbone, steps=steps, time_budget=time_budget,
        head_lr=head_lr, backbone_lr=backbone_lr, lr_schedule=_value(lr_schedule), warmup_fraction=warmup_fraction,
        grad_clip_norm=grad_clip_norm, ema_decay=ema_decay, augment=augment_spec, batch_size=batch_size, out=out,
        seed=seed, val_every=val_every, ckpt_every=ckpt_every, device=device, workers=workers,
    )
    run = train(cfg, resume=resume)  # Ctrl-C: cli.py says to re-run with --resume
    summary = (run / "summary.json")
    logging.getLogger("uniret").info("run written to %s (%s)", run, summary.read_text().strip() if summary.is_file() else "")
