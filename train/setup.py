"""What a run is built from, checked before anything is written: the device, the output directory
(never another command's or user's directory, never inside an input), the model to train (the
options of ``uniret model init``) and each domain's training transform."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UniretError, UsageError
from ..guards import check_apart, check_writable
from ..utils import resolve_device
from .augment import DEFAULT_SPEC, build_transform, domain_specs
from .config import TrainConfig
from .distributed import DistContext
from .rundir import RunDir


def pick_device(name: str, ctx: DistContext) -> torch.device:
    """This process's device (``utils.resolve_device``; ``cuda`` = the local rank's GPU under torchrun)."""
    device = torch.device(resolve_device(name, local_rank=ctx.local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_output(run: RunDir, config: TrainConfig, resume: bool) -> None:
    """Refuse an ``--out`` that would overwrite or mix with something that is not this run: inside
    (or holding) an input, unwritable, a foreign non-empty directory or a file; ``--resume`` needs a run."""
    inputs = [config.data, config.weights, *([config.backbone] if Path(config.backbone).exists() else [])]
    check_apart(run.path, inputs)
    check_writable(run.path)
    if resume:
        if not run.is_run():
            raise UsageError(f"--resume: {run.path} holds no training run (no {run.config_file.name}); "
                             f"drop --resume to start a new run")
        run.refuse_legacy()
        return
    if run.is_run():
        raise UniretError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
    if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
        raise UsageError(f"--out {run.path} exists and is not a uniret run; choose a new or empty directory")


def build_embedder(config: TrainConfig):
    """The model to train, built from the same options as ``uniret model init``."""
    from ..embed.spec import ModelSpec

    return ModelSpec.of(config).build()


def domain_transforms(embedder, config: TrainConfig, domains: list[str]) -> dict:
    """Each training domain's augmentation (``augment`` + ``augment_domains``) on the model's input;
    the reference spec is the model's own train transform (``UniversalEmbedder.transforms()``)."""
    specs = domain_specs(config.augment, config.augment_domains, domains)
    reference = embedder.transforms()[0]
    return {d: reference if spec == DEFAULT_SPEC else build_transform(embedder.config.preprocess, spec)
            for d, spec in zip(domains, specs, strict=True)}
