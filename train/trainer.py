"""The training loop: one iteration-based loop for every method of :mod:`uniret.train.methods`.

Each step: the domain sampler picks ONE domain, its infinite sampler hands out the global batch's
positions, this rank loads its slice (with that domain's augmentation), the method computes its
losses, gradients are averaged over ranks (and clipped), AdamW steps with the scheduled learning
rates (:mod:`uniret.train.optim`), the EMA follows, and the sampler records the loss it follows
(returning an update event when its probabilities change). A step whose loss is not finite is not
applied; ``max_nonfinite_steps`` of them in a row stop the run with an error. Validation (merged
protocol, mean R@1 over domains) every ``val_every`` steps keeps the best weights; checkpoints every
``ckpt_every`` steps make the run resumable exactly. See :mod:`uniret.train.rundir` for the files.

A run is ``steps`` long, or ``time_budget`` minutes: the loop then stops at the first step boundary
past the budget and every schedule is stretched to it (progress = fraction of the budget spent).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import testing
from ..errors import UniretError
from ..guards import output_lock
from ..utils import atomic_write_json, git_commit
from .config import TrainConfig
from .data import TrainData, ValData, resolve_domains, sample_seed
from .distributed import DistContext, average_gradients, average_scalars, broadcast_float
from .loop import fit
from .methods import method_class
from .model import TrainingModel
from .optim import clip_gradients, make_ema, make_optimizer, make_schedules, set_learning_rates
from .rundir import (
    RunDir,
    config_differences,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    prefixed,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unprefixed,
)
from .samplers import InfiniteIndexSampler, make_domain_sampler
from .setup import build_embedder, check_output, domain_transforms, pick_device
from .validate import validate

logger = logging.getLogger("uniret")


def method_losses(model: TrainingModel, images: torch.Tensor, labels: torch.Tensor, domain: int,
                  ctx: DistContext | None = None, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Forward one single-domain batch and return the method's losses (``loss`` = what to minimise).

    ``labels`` are already in the classifier's label space (``method.classifier_labels``).
    """
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
    with amp:
        out = model(images, domain)
    return model.method.losses(out, labels, ctx or DistContext())


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.ctx = DistContext.from_env()
        if config.batch_size % self.ctx.world_size:
            raise UniretError(
                f"--batch-size {config.batch_size} must divide evenly over {self.ctx.world_size} processes"
            )
        self.device = pick_device(config.device, self.ctx)
        self.run = RunDir(config.out)
        check_output(self.run, config, resume)  # before building anything
        self._lock = contextlib.ExitStack()
        if self.ctx.is_main:  # a second command writing this run gets a one-line error
            self._lock.enter_context(output_lock(self.run.path, "training run"))
            check_output(self.run, config, resume)  # again, under the lock
        try:
            self._build(config, resume)
        except BaseException:
            self._lock.close()
            raise

    def _build(self, config: TrainConfig, resume: bool) -> None:
        from ..data import open_collection

        self.ctx.barrier()  # every rank has looked before rank 0 writes the run directory
        torch.manual_seed(config.seed)
        embedder = build_embedder(config)
        method = method_class(config.method)
        domains = resolve_domains(open_collection(config.data), method.training_domains(config))
        transforms = domain_transforms(embedder, config, domains)
        views = (config.cache_seed, config.cache_views) if config.frozen_part else None
        self.data = TrainData(config.data, domains, transforms, 0 if views and config.cache_features else config.workers,
                              views=views)
        self.domains = self.data.domains
        self.method = method(config, self.data.num_classes)
        self.cache_seconds = 0.0
        prefix = cached = None
        if config.frozen_part:
            prefix, cached = self._frozen_part(embedder, transforms)
        self.model = TrainingModel(embedder, self.method, frozen=prefix, cached=cached).to(self.device)
        # convolutions run faster in NHWC on GPUs (and for CNNs on CPUs through oneDNN: opt in)
        self.channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = make_optimizer(self.model, config)
        self.schedules = make_schedules(config)
        self.ema = make_ema(self.model.embedder, config)
        self.sampler = make_domain_sampler(config.sampler, self.data.sizes, config.seed,
                                           config.dynamic_interval, config.dynamic_window)
        self.index_samplers = [InfiniteIndexSampler(n, config.seed, key=i) for i, n in enumerate(self.data.sizes)]
        self.val = ValData(config.data, self.domains, config.val_split, embedder.transforms()[1])
        self._cached_val = None
        if cached is not None and (config.ema_decay is None or config.freeze_backbone):  # (an EMA has its own rest)
            from .frozen import CachedEmbedder, CachedValData

            self._cached_val = CachedValData(self.val, prefix, self.device)
            self._cached_val_embedder = lambda e: CachedEmbedder(e, cached)
        if not len(self.val) and config.val_split != "val":
            raise UniretError(f"val_split {config.val_split!r}: no training domain has that split; "
                              f"choose a split of the collection or leave the default")
        self.autocast = config.amp != "off" and self.device.type == "cuda"
        self.step = 0
        # seconds of training, over every session of the run; building the feature cache counts
        self.elapsed = self.cache_seconds
        self.nonfinite = 0  # consecutive steps with a non-finite loss
        self.best = {"R@1": None, "step": None}
        self._prepare_run(resume)

    def _frozen_part(self, embedder, transforms):
        """Freeze the backbone's prefix and, with ``cache_features``, put the cached data in place."""
        from .frozen import CachedTrainData, FeatureCache, freeze, split_backbone

        config = self.config
        prefix, rest = split_backbone(embedder.backbone, config.train_blocks)
        freeze(prefix)
        if not config.cache_features:
            return prefix, None
        if config.feature_cache:
            root = Path(config.feature_cache)
        else:
            from ..embed.default import cache_root

            root = cache_root() / "features"
        key = {"backbone": embedder.config.backbone, "train_blocks": config.train_blocks,
               "preprocess": embedder.config.preprocess, "augment": config.augment,
               "augment_domains": config.augment_domains}
        cache = FeatureCache(root, self.data, prefix.to(self.device), key, config.cache_views, config.cache_seed,
                             config.cache_dtype, embedder.config.preprocess["input_size"], inputs=[config.data])
        features, readable, seconds = cache.build(self.device, batch_size=min(config.val_batch_size, 256))
        self.cache_seconds = seconds
        self.data = CachedTrainData(self.data, features, readable, config.cache_views)
        return prefix, rest

    # -- run directory and resume ----------------------------------------------------------------
    def _run_header(self) -> dict:
        return {
            "config": self.config.to_json(),
            "git_commit": git_commit(),
            "domains": self.domains,
            "num_classes": self.data.num_classes,
            "train_images": self.data.sizes,
            "world_size": self.ctx.world_size,
            "torch": torch.__version__,
        }

    def _prepare_run(self, resume: bool) -> None:
        if resume:
            diff = config_differences(self.run.read_config() or {}, self.config.to_json())
            if diff:
                raise UniretError(f"--resume with changed option(s) {', '.join(diff)}; use the run's original options")
        if resume and self.run.last.is_file():
            self._load(*load_checkpoint(self.run.last))
            if self.ctx.is_main:
                self.run.truncate_metrics(self.step)
            logger.info("resuming %s at step %d", self.run.path, self.step)
        elif self.ctx.is_main:
            if resume:
                logger.info("%s: no checkpoint yet; starting the run from step 0", self.run.path)
            self.run.create(self._run_header())
        if self.config.absent_heads == "update":
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        self.ctx.barrier()

    def save_last(self) -> None:
        if not self.ctx.is_main:
            return
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer)
        rng_tensors, rng_meta = rng_state()
        tensors = {**prefixed("model", self.model.state_dict()), **prefixed("optimizer", opt_tensors),
                   **prefixed("rng", rng_tensors)}
        if self.ema is not None:
            tensors.update(prefixed("ema", self.ema.module.state_dict()))
        self._check_finite(tensors, "checkpoint")
        save_checkpoint(self.run.last, tensors, {
            "step": self.step, "elapsed": self.elapsed, "optimizer": opt_meta, "rng": rng_meta,
            "sampler": self.sampler.state_dict(), "index_samplers": [s.state_dict() for s in self.index_samplers],
            "best": dict(self.best), "config": self.config.to_json(),
        })

    def _load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        try:
            self.model.load_state_dict(unprefixed("model", tensors))
            optimizer_from_flat(self.optimizer, unprefixed("optimizer", tensors), state["optimizer"])
            if self.ema is not None:
                self.ema.module.load_state_dict(unprefixed("ema", tensors))
            self.sampler.load_state_dict(state["sampler"])
            for s, st in zip(self.index_samplers, state["index_samplers"], strict=True):
                s.load_state_dict(st)
            set_rng_state(unprefixed("rng", tensors), state["rng"])
            self.best = dict(state["best"])
            self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise UniretError(f"{self.run.last}: does not fit this run ({str(exc).splitlines()[0]}); "
                              f"start a new run with another --out") from None

    def _check_finite(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UniretError(f"training stopped at step {self.step}: non-finite weights ({bad[0]}, ...) were not "
                              f"written as a {what}; the last checkpoint holds the last good state: lower the "
                              f"learning rates or set grad_clip_norm and start a new run")

    # -- one step ----------------------------------------------------------------------------------
    def progress(self) -> float:
        """Fraction of the run done: of the steps, or of the time budget."""
        if self.config.time_budget:
            return min(1.0, self.elapsed / (60.0 * self.config.time_budget))
        return self.step / self.config.steps

    def done(self) -> bool:
        return self.progress() >= 1.0

    def train_step(self) -> tuple[int, dict[str, float], dict | None]:
        """One step; returns the domain, the loss values (and learning rates) and the sampler's update
        event (or None)."""
        config, ctx = self.config, self.ctx
        lrs = set_learning_rates(self.optimizer, self.schedules, self.progress())
        domain = self.sampler.next_domain()
        positions = self.index_samplers[domain].take(config.batch_size)
        local = config.batch_size // ctx.world_size
        lo = ctx.rank * local
        seeds = [sample_seed(config.seed, self.step, slot) for slot in range(lo, lo + local)]
        images, labels = self.data.load(domain, positions[lo : lo + local], seeds)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = self.method.classifier_labels(domain, labels)
        losses = method_losses(self.model, images, labels, domain, ctx, self.autocast)
        self.optimizer.zero_grad(set_to_none=config.absent_heads == "skip")
        losses["loss"].backward()
        average_gradients([p for p in self.model.parameters() if p.requires_grad], ctx)
        values = average_scalars({k: v.item() for k, v in losses.items()}, ctx)
        update = None
        if math.isfinite(values["loss"]):
            self.nonfinite = 0
            grad_norm = clip_gradients(self.model.parameters(), config.grad_clip_norm)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model.embedder, step=self.step)
            update = self.sampler.record(domain, values[self.method.sampler_loss])
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
        else:  # not applied: the weights stay those of the last finite step
            self.nonfinite += 1
            if self.nonfinite >= config.max_nonfinite_steps:
                raise UniretError(
                    f"training stopped at step {self.step + 1}: the loss was not finite for {self.nonfinite} "
                    f"consecutive steps (the run diverged); no model was exported and {self.run.last.name} holds "
                    f"the last good state: lower head_lr/backbone_lr or set grad_clip_norm and start a new run")
        self.step += 1
        return domain, {**values, **{f"lr_{k}": v for k, v in lrs.items()}}, update

    def tick(self, seconds: float) -> None:
        """Add the wall time of the last step; under DDP rank 0's clock decides for everyone."""
        self.elapsed = broadcast_float(self.elapsed + seconds, self.ctx)

    def interrupt_point(self) -> None:
        testing.interrupt_point("train", self.step)

    # -- validation --------------------------------------------------------------------------------
    def exported_embedder(self):
        """The weights that are validated and exported: the EMA when enabled, else the model's."""
        return self.ema.module if self.ema is not None else self.model.embedder

    def validate(self) -> dict | None:
        if not len(self.val):
            return None
        result = None
        if self.ctx.is_main:
            embedder = self.exported_embedder()
            val = self.val
            if self._cached_val is not None:  # the frozen prefix's outputs, computed once
                val, embedder = self._cached_val, self._cached_val_embedder(embedder)
            result = validate(embedder, val, self.config.val_batch_size, self.device, self.autocast)
            embedder = self.exported_embedder()
            self.run.log({"kind": "val", "step": self.step, **result})
            logger.info("step %d: merged val R@1 %.4f (%s)", self.step, result["R@1"] or 0.0,
                        " ".join(f"{d} {v:.3f}" for d, v in result["per_domain_R@1"].items() if v is not None))
            r1 = result["R@1"]
            if r1 is not None and (self.best["R@1"] is None or r1 > self.best["R@1"]):
                self.best = {"R@1": r1, "step": self.step}
                save_checkpoint(self.run.best, embedder.state_dict(), {"step": self.step, "R@1": r1})
        self.model.train()
        self.ctx.barrier()
        return result

    def finish(self) -> None:
        """Export ``RUN/model``: the best validated weights when validation ran, else the last."""
        if self.ctx.is_main:
            embedder = copy.deepcopy(self.exported_embedder()).to("cpu")
            chosen = "last"
            if self.best["step"] is not None and self.run.best.is_file():
                embedder.load_state_dict(load_checkpoint(self.run.best)[0])
                chosen = "best"
            self._check_finite(embedder.state_dict(), "model")
            provenance = dict(embedder.config.provenance)
            provenance["training"] = {
                "run": str(self.run.path), "method": self.config.method, "sampler": self.config.sampler,
                "domains": self.domains, "steps": self.step, "weights": chosen,
                "best_val_R@1": self.best["R@1"], "best_step": self.best["step"], "git_commit": git_commit(),
            }
            embedder.save(self.run.model_dir, provenance=provenance)
            atomic_write_json(self.run.summary_file, {
                "steps": self.step, "train_seconds": round(self.elapsed, 1), "exported": chosen,
                "best_val_R@1": self.best["R@1"], "best_step": self.best["step"], "model": str(self.run.model_dir),
            })
        self.ctx.barrier()

    def close(self) -> None:
        self.data.close()
        self._lock.close()


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train with ``config``; returns the run directory."""
    config = TrainConfig.from_json(config.to_json()).validate()
    config.data = str(Path(config.data).resolve())
    config.out = str(Path(config.out).resolve())
    trainer = Trainer(config, resume=resume)
    try:
        fit(trainer)
        return trainer.run.path
    finally:
        trainer.close()
