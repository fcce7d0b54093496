"""The training loop: one iteration-based loop for every method of :mod:`uniret.train.methods`.

Each step: the domain sampler picks ONE domain, its infinite sampler hands out the global batch's
positions, this rank loads its slice, the method computes its losses, gradients are averaged over
ranks, AdamW steps, and the sampler records the loss it follows (returning an update event when its
probabilities change). Validation (merged protocol, mean R@1 over domains) every
``val_every`` steps keeps the best weights; checkpoints every ``ckpt_every`` steps make the run
resumable exactly. See :mod:`uniret.train.rundir` for the files written.

Optimiser: AdamW with two groups, heads + classifiers (``head_lr``) and backbone (``backbone_lr``,
0 for the first ``backbone_freeze_fraction`` of the steps). Heads of domains absent from a step:
``absent_heads="update"`` (default, the reference's behaviour) gives every parameter a zero
gradient, so AdamW keeps moving them with their decaying moments and weight decay; ``"skip"``
leaves their gradient None and PyTorch's AdamW leaves them untouched.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .. import testing
from ..errors import UniretError
from ..utils import atomic_write_json, git_commit, progress_bar, resolve_device
from .config import TrainConfig
from .data import TrainData, ValData, sample_seed
from .distributed import DistContext, average_gradients, average_scalars
from .methods import method_class
from .model import TrainingModel
from .rundir import RunDir, config_differences, rng_state, set_rng_state
from .samplers import InfiniteIndexSampler, make_domain_sampler
from .validate import validate

logger = logging.getLogger("uniret")


def make_optimizer(model: TrainingModel, config: TrainConfig) -> torch.optim.AdamW:
    groups = [
        {"params": model.head_parameters(), "lr": config.head_lr, "name": "heads"},
        {"params": model.backbone_parameters(), "lr": config.backbone_lr, "name": "backbone"},
    ]
    return torch.optim.AdamW(groups, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)


def backbone_lr_at(step: int, config: TrainConfig) -> float:
    return 0.0 if step < config.freeze_steps else config.backbone_lr


def method_losses(model: TrainingModel, images: torch.Tensor, labels: torch.Tensor, domain: int,
                  ctx: DistContext | None = None, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Forward one single-domain batch and return the method's losses (``loss`` = what to minimise).

    ``labels`` are already in the classifier's label space (``method.classifier_labels``).
    """
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
    with amp:
        out = model(images, domain)
    return model.method.losses(out, labels, ctx or DistContext())


def build_embedder(config: TrainConfig):
    """The model to train, built from the same options as ``uniret model init``."""
    from ..embed.model import build_model

    embedder = build_model(config.backbone, dim=config.dim, nested_dims=config.nested_dims,
                           pretrained=config.pretrained, weights=config.weights, image_size=config.image_size,
                           pool=config.pool, crop_pct=config.crop_pct)
    return embedder


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.ctx = DistContext.from_env()
        if config.batch_size % self.ctx.world_size:
            raise UniretError(
                f"--batch-size {config.batch_size} must divide evenly over {self.ctx.world_size} processes"
            )
        self.device = torch.device(resolve_device(config.device, local_rank=self.ctx.local_rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.run = RunDir(config.out)
        if not resume and self.run.config_file.is_file():  # fail before building anything
            raise UniretError(f"{self.run.path} already holds a run; pass --resume to continue it or choose another --out")
        self.ctx.barrier()  # every rank has looked before rank 0 writes the run directory
        torch.manual_seed(config.seed)
        embedder = build_embedder(config)
        train_transform, eval_transform = embedder.transforms()
        method = method_class(config.method)
        self.data = TrainData(config.data, method.training_domains(config),
                              train_transform, config.workers)
        self.domains = self.data.domains
        self.method = method(config, self.data.num_classes)
        self.model = TrainingModel(embedder, self.method).to(self.device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, config)
        self.sampler = make_domain_sampler(config.sampler, self.data.sizes, config.seed,
                                           config.dynamic_interval, config.dynamic_window)
        self.index_samplers = [InfiniteIndexSampler(n, config.seed, key=i) for i, n in enumerate(self.data.sizes)]
        self.val = ValData(config.data, self.domains, config.val_split, eval_transform)
        self.autocast = config.amp != "off" and self.device.type == "cuda"
        self.step = 0
        self.best = {"R@1": None, "step": None}
        self._prepare_run(resume)

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
        saved = self.run.read_config()
        if resume and self.run.last.is_file():
            diff = config_differences(saved or {}, self.config.to_json())
            if diff:
                raise UniretError(f"--resume with changed option(s) {', '.join(diff)}; use the run's original options")
            self._load(self.run.load_checkpoint(self.run.last))
            if self.ctx.is_main:
                self.run.truncate_metrics(self.step)
            logger.info("resuming %s at step %d", self.run.path, self.step)
        elif self.ctx.is_main:
            self.run.prepare()
            self.run.metrics_file.unlink(missing_ok=True)  # a run that died before its first checkpoint
            self.run.write_config(self._run_header())
        if self.config.absent_heads == "update":
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
        self.ctx.barrier()

    def _state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "index_samplers": [s.state_dict() for s in self.index_samplers],
            "rng": rng_state(),
            "best": dict(self.best),
            "config": self.config.to_json(),
        }

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        for s, st in zip(self.index_samplers, state["index_samplers"], strict=True):
            s.load_state_dict(st)
        set_rng_state(state["rng"])
        self.best = dict(state["best"])
        self.step = int(state["step"])

    def save_last(self) -> None:
        if self.ctx.is_main:
            self.run.save_checkpoint(self.run.last, self._state())

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self) -> tuple[int, dict[str, float], dict | None]:
        """One step; returns the domain, the loss values and the sampler's update event (or None)."""
        config, ctx = self.config, self.ctx
        for group in self.optimizer.param_groups:
            if group["name"] == "backbone":
                group["lr"] = backbone_lr_at(self.step, config)
        domain = self.sampler.next_domain()
        positions = self.index_samplers[domain].take(config.batch_size)
        local = config.batch_size // ctx.world_size
        lo = ctx.rank * local
        seeds = [sample_seed(config.seed, self.step, slot) for slot in range(lo, lo + local)]
        images, labels = self.data.load(domain, positions[lo : lo + local], seeds)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        labels = self.method.classifier_labels(domain, labels)
        losses = method_losses(self.model, images, labels, domain, ctx, self.autocast)
        self.optimizer.zero_grad(set_to_none=config.absent_heads == "skip")
        losses["loss"].backward()
        average_gradients(list(self.model.parameters()), ctx)
        self.optimizer.step()
        values = average_scalars({k: v.item() for k, v in losses.items()}, ctx)
        update = self.sampler.record(domain, values[self.method.sampler_loss])
        self.step += 1
        return domain, values, update

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> dict | None:
        if not len(self.val):
            return None
        result = None
        if self.ctx.is_main:
            result = validate(self.model.embedder, self.val, self.config.val_batch_size, self.device, self.autocast)
            record = {"kind": "val", "step": self.step, **result}
            self.run.log(record)
            logger.info("step %d: merged val R@1 %.4f (%s)", self.step, result["R@1"] or 0.0,
                        " ".join(f"{d} {v:.3f}" for d, v in result["per_domain_R@1"].items() if v is not None))
            r1 = result["R@1"]
            if r1 is not None and (self.best["R@1"] is None or r1 > self.best["R@1"]):
                self.best = {"R@1": r1, "step": self.step}
                self.run.save_checkpoint(self.run.best, {"step": self.step, "R@1": r1,
                                                         "embedder": self.model.embedder.state_dict()})
        self.model.train()
        self.ctx.barrier()
        return result

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> Path:
        config = self.config
        if self.step == 0 and config.val_every and len(self.val):
            self.validate()  # the untrained model: the baseline every later value is read against
        window: dict[str, list[float]] = defaultdict(list)
        per_domain: dict[str, list[float]] = defaultdict(list)
        seen = 0
        t0 = time.perf_counter()
        with progress_bar(f"train {config.method}", config.steps, disable=not self.ctx.is_main) as advance:
            advance(self.step)
            while self.step < config.steps:
                testing.interrupt_point("train", self.step)
                domain, values, update = self.train_step()
                for k, v in values.items():
                    window[k].append(v)
                per_domain[self.domains[domain]].append(values["loss"])
                seen += config.batch_size
                if self.ctx.is_main and update is not None:
                    self.run.log({**update, "kind": "sampler", "step": self.step, "first_step": update["step"],
                                  "domains": self.domains})
                ips = seen / max(time.perf_counter() - t0, 1e-9)
                probs = self.sampler.probabilities()
                advance(1, info=f"loss {values['loss']:.3f}  {ips:.0f} img/s  p=[{' '.join(f'{p:.2f}' for p in probs)}]")
                if self.step % config.log_every == 0 or self.step == config.steps:
                    if self.ctx.is_main:
                        self.run.log({
                            "kind": "train", "step": self.step,
                            **{k: float(np.mean(v)) for k, v in window.items()},
                            "per_domain_loss": {d: float(np.mean(v)) for d, v in per_domain.items()},
                            "probabilities": dict(zip(self.domains, probs, strict=True)),
                            "backbone_lr": backbone_lr_at(self.step - 1, config),
                            "images_per_s": ips, "decode_failures": self.data.decode_failures,
                        })
                    window.clear()
                    per_domain.clear()
                last = self.step == config.steps
                if config.val_every and (self.step % config.val_every == 0 or last):
                    self.validate()
                if (config.ckpt_every and self.step % config.ckpt_every == 0) or last:
                    self.save_last()
        self.finish()
        return self.run.path

    def finish(self) -> None:
        """Export ``RUN/model``: the best validated weights when validation ran, else the last."""
        if self.ctx.is_main:
            embedder = copy.deepcopy(self.model.embedder).to("cpu")
            chosen = "last"
            if self.best["step"] is not None and self.run.best.is_file():
                embedder.load_state_dict(self.run.load_checkpoint(self.run.best)["embedder"])
                chosen = "best"
            provenance = dict(embedder.config.provenance)
            provenance["training"] = {
                "run": str(self.run.path), "method": self.config.method, "sampler": self.config.sampler,
                "domains": self.domains, "steps": self.step, "weights": chosen,
                "best_val_R@1": self.best["R@1"], "best_step": self.best["step"], "git_commit": git_commit(),
            }
            embedder.save(self.run.model_dir, provenance=provenance)
            atomic_write_json(self.run.summary_file, {
                "steps": self.step, "exported": chosen, "best_val_R@1": self.best["R@1"],
                "best_step": self.best["step"], "model": str(self.run.model_dir),
            })
        self.ctx.barrier()

    def close(self) -> None:
        self.data.close()


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train with ``config``; returns the run directory."""
    config = TrainConfig.from_json(config.to_json()).validate()
    config.data = str(Path(config.data).resolve())
    config.out = str(Path(config.out).resolve())
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()
