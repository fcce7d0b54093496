"""Optimisation: AdamW with two parameter groups, a learning-rate schedule per group, gradient
clipping and an optional EMA of the exported weights.

Groups: heads + classifiers (``head_lr``) and backbone (``backbone_lr``). Each group follows its own
schedule over its own span of the run: the heads over all of it, the backbone from the end of its
frozen part (``backbone_freeze_fraction``, lr 0 before) to the end. A schedule is timm's
(``CosineLRScheduler``, ``MultiStepLRScheduler``; constant = a multi-step schedule without steps),
with a linear warm-up from 0, evaluated on the fraction of the run done: ``step / steps``, or the
fraction of ``--time-budget`` spent, so a budgeted run stretches every schedule to its budget.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .config import TrainConfig

#: Schedules run on a grid of this many ticks per span (timm schedules take integer time).
TICKS = 100_000


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    groups = [
        {"params": model.head_parameters(), "lr": config.head_lr, "name": "heads"},
        {"params": model.backbone_parameters(), "lr": config.backbone_lr, "name": "backbone"},
    ]
    # foreach: one fused update over each group's tensors (torch leaves it off on the CPU, where the
    # per-tensor loop dominates short steps such as head training on cached features)
    return torch.optim.AdamW(groups, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
                             foreach=True)


class GroupSchedule:
    """The learning rate of one group as a function of the run's progress in [0, 1]."""

    def __init__(self, base_lr: float, kind: str, warmup: float, start: float = 0.0,
                 min_lr_ratio: float = 0.0, milestones: list[float] | None = None, gamma: float = 0.1):
        from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

        self.base_lr, self.start = float(base_lr), float(start)
        # timm schedulers set the lr of an optimiser's param groups; this one drives a private group
        # whose value is read back, so one timm scheduler serves one group of the real optimiser.
        holder = SimpleNamespace(param_groups=[{"lr": self.base_lr}])
        warmup_t = int(round(warmup * TICKS))
        if kind == "cosine":
            self._timm = CosineLRScheduler(holder, t_initial=max(1, TICKS - warmup_t), lr_min=min_lr_ratio * self.base_lr,
                                           warmup_t=warmup_t, warmup_prefix=True, t_in_epochs=False)
        else:  # constant | step (milestones: fractions of the span, warm-up included)
            decay_t = [int(round(m * TICKS)) for m in (milestones or [])] if kind == "step" else []
            self._timm = MultiStepLRScheduler(holder, decay_t=decay_t, decay_rate=gamma, warmup_t=warmup_t,
                                              warmup_prefix=False, t_in_epochs=False)

    def __call__(self, progress: float) -> float:
        if progress < self.start or self.base_lr == 0.0:
            return 0.0
        span = (progress - self.start) / max(1e-12, 1.0 - self.start)
        self._timm.step_update(int(round(min(span, 1.0) * TICKS)))
        return float(self._timm.optimizer.param_groups[0]["lr"])


def make_schedules(config: TrainConfig) -> dict[str, GroupSchedule]:
    """The heads' and the backbone's schedules, by group name. With a step budget the backbone
    unfreezes at step ``config.freeze_steps`` exactly (progress ``step / steps``)."""
    common = {"min_lr_ratio": config.min_lr_ratio, "milestones": config.step_milestones, "gamma": config.step_gamma}
    start = config.backbone_freeze_fraction if config.time_budget else config.freeze_steps / config.steps
    return {
        "heads": GroupSchedule(config.head_lr, config.lr_schedule, config.warmup_fraction, **common),
        "backbone": GroupSchedule(
            config.backbone_lr, config.backbone_lr_schedule or config.lr_schedule,
            config.warmup_fraction if config.backbone_warmup_fraction is None else config.backbone_warmup_fraction,
            start=start, **common),
    }


def set_learning_rates(optimizer: torch.optim.Optimizer, schedules: dict[str, GroupSchedule], progress: float) -> dict:
    """Set every group's lr for the step about to run; returns them by group name."""
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]] = schedules[group["name"]](progress)
    return lrs


def clip_gradients(parameters, max_norm: float | None) -> float | None:
    """Clip the global gradient norm to ``max_norm`` (torch's clip_grad_norm_); returns the norm before."""
    if max_norm is None:
        return None
    grads = [p for p in parameters if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def make_ema(embedder, config: TrainConfig):
    """timm's ModelEmaV3 of the embedder (with its warm-up, so short runs are not dominated by the
    random start), or None when ``ema_decay`` is unset."""
    if config.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(embedder, decay=config.ema_decay, use_warmup=True)
