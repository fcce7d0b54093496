"""Training configuration: one typed dataclass whose defaults are the reference recipe (METHOD.md §3).

A run is configured by, in increasing priority: these defaults, an optional JSON file
(``--config FILE``, keys = field names), and the explicit CLI options. Values are type-checked
against the field annotations and range-checked (one-line errors). The resolved config is written to
``RUN/train_config.json`` and a resumed run checks that it still matches.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..embed.spec import ModelSpec
from ..errors import UniretError, UsageError
from ..safeio import read_json
from .augment import check_spec
from .methods import method_class
from .samplers import SAMPLERS

ABSENT_HEAD_POLICIES = ("update", "skip")
LR_SCHEDULES = ("constant", "cosine", "step")

MAX_TIME_BUDGET = 525_600  # minutes (a year): a longer --time-budget is a typo, not a plan


@dataclass
class TrainConfig(ModelSpec):
    """Everything that defines a training run: the model's :class:`ModelSpec` and the training
    options. Defaults follow the UDON reference recipe."""

    # -- what to train on and where to write ----------------------------------------------------
    data: str = ""
    out: str = ""
    method: str = "udon"
    domain: str | None = None  # the one domain of --method specialist
    sampler: str | None = None  # None: the method's (udon dynamic, uscrr round_robin, ujc size)
    # -- model: the fields of uniret.embed.spec.ModelSpec (the options of `uniret model init`), with
    # the reference's backbone and a 64-d student as defaults ------------------------------------------
    backbone: str = "timm:vit_base_patch16_224"
    dim: int = 64  # universal (student) embedding
    teacher_dim: int = 256
    # -- a frozen part of the backbone (uniret.train.frozen) ------------------------------------------
    freeze_backbone: bool = False  # heads only: the backbone's pooled features are cached
    train_blocks: int | None = None  # only the last N stages (+ conv head, pooling) train; the rest is cached
    cache_features: bool = True  # False: the frozen part runs in the loop (same views, no cache)
    cache_views: int = 4  # augmented views of each train image (the frozen part's inputs)
    cache_seed: int = 0  # seed of the views (not the run's: runs with other seeds share one cache)
    cache_dtype: str = "float16"  # float16 | float32: how cached outputs are stored
    feature_cache: str | None = None  # cache directory (shared by runs, keyed by content); None: the uniret cache
    # -- length -----------------------------------------------------------------------------------
    steps: int = 1000
    # Minutes of training (validation and checkpoints included): train until they are spent, with
    # every schedule stretched to the budget instead of to ``steps`` (which is then ignored).
    time_budget: float | None = None
    batch_size: int = 128  # global batch (split over ranks under torchrun)
    seed: int = 0
    # -- optimiser (AdamW, two parameter groups: heads and backbone) ------------------------------
    head_lr: float = 1e-3  # heads and classifiers
    backbone_lr: float = 1e-5
    backbone_freeze_fraction: float = 0.2  # backbone lr is 0 for this first part (2 of 10 epochs)
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Learning-rate schedule of each group over its own span (the backbone's starts when it unfreezes),
    # timm's schedulers: constant (the reference) | cosine (to min_lr_ratio x lr) | step (x step_gamma
    # at each of step_milestones, fractions of the span); linear warm-up from 0 over warmup_fraction.
    lr_schedule: str = "constant"
    warmup_fraction: float = 0.0
    backbone_lr_schedule: str | None = None  # None: lr_schedule
    backbone_warmup_fraction: float | None = None  # None: warmup_fraction
    min_lr_ratio: float = 0.0
    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    step_gamma: float = 0.1
    grad_clip_norm: float | None = None  # clip the global gradient norm (None = never, the reference)
    # Exponential moving average of the embedder's weights (timm ModelEmaV3), e.g. 0.999: validation
    # and the exported model use the average. None = off (the reference).
    ema_decay: float | None = None
    # Stop with an error after this many consecutive steps with a non-finite loss (those steps are not
    # applied, so the weights and the last checkpoint stay finite).
    max_nonfinite_steps: int = 3
    # "update": heads of domains absent from a step get a zero gradient, so AdamW still moves them
    # with their decaying moments and weight decay, as the reference (optax) optimiser does.
    # "skip": their gradient is None and PyTorch's AdamW leaves them and their state untouched.
    absent_heads: str = "update"
    # -- losses -----------------------------------------------------------------------------------
    cls_scale: float = 16.0  # normalised softmax scale, teacher and student
    cls_margin: float = 0.0  # CosFace additive margin on the target cosine (0: plain normalised softmax)
    distill_temperature: float = 0.1
    relational_factor: float = 0.25  # L_rel = (factor * B) * mean((S_u - S_t)^2), B/4 in the paper
    weight_cls_teacher: float = 0.25  # L = (L_cls_t + L_cls_u + L_log + L_rel) / 4
    weight_cls_student: float = 0.25
    weight_logit: float = 0.25
    weight_relational: float = 0.25
    # False: e_b is detached for L_log and L_rel, so distillation trains the student head and its
    # classifier but not the backbone (an ablation; the reference distils into the backbone too).
    distill_to_backbone: bool = True
    # -- augmentation (train/augment.py): a spec for every domain and per-domain overrides, e.g.
    # {"crop": "rrc", "scale": [0.35, 1], "hflip": 0.0} and {"icons": {"hflip": 0.5}}. Empty: the
    # reference's (squash-resize to 256/224, random crop, horizontal flip).
    augment: dict = field(default_factory=dict)
    augment_domains: dict = field(default_factory=dict)
    # -- dynamic sampler ---------------------------------------------------------------------------
    dynamic_interval: int = 1000  # U: round-robin for the first U steps, new p every U steps
    dynamic_window: int = 1000  # steps whose losses make the per-domain mean
    # -- validation, checkpoints, logging -----------------------------------------------------------
    val_every: int = 1000  # 0 = never
    val_split: str = "val"
    val_batch_size: int = 256
    ckpt_every: int = 1000
    log_every: int = 10
    workers: int = 0  # image-decoding processes; 0 = in the training process
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, float32 on CPU) | bf16 | off
    # NHWC memory format for the model and batches; None: on CUDA only. true also speeds up CNNs on a
    # CPU (oneDNN: 6-conv CNN forward+backward at 64 px ~1.25x on this 2-core machine).
    channels_last: bool | None = None
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.json

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @staticmethod
    def from_json(obj: dict) -> TrainConfig:
        fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            raise UsageError(
                f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        values = {name: _typed(name, fields[name], value) for name, value in obj.items()}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return TrainConfig(**values)

    def validate(self) -> TrainConfig:
        """Raise a one-line :class:`UniretError` for options that cannot work together."""
        if not self.data:
            raise UsageError("no training data: pass --data ROOT|LMDB")
        if not self.out:
            raise UsageError("no run directory: pass --out RUN")
        method = method_class(self.method)
        method.check_config(self)
        if self.sampler is None:
            self.sampler = method.default_sampler
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.absent_heads not in ABSENT_HEAD_POLICIES:
            raise UsageError(f"absent_heads must be one of {', '.join(ABSENT_HEAD_POLICIES)}")
        if self.amp not in ("auto", "bf16", "off"):
            raise UsageError(f"amp must be auto, bf16 or off, not {self.amp!r}")
        most = {"batch_size": 65_536, "val_batch_size": 65_536, "dim": 65_536, "teacher_dim": 65_536,
                "workers": 1_024}  # others: counts of steps, at most 2^62 (beyond, int64 overflows)
        for name in ("steps", "batch_size", "dim", "teacher_dim", "dynamic_interval", "dynamic_window",
                     "val_batch_size", "log_every"):
            if not 1 <= getattr(self, name) <= most.get(name, 2**62):
                raise UsageError(f"{name} must be 1..{most.get(name, 2**62):,}, got {getattr(self, name)}")
        for name in ("val_every", "ckpt_every", "workers"):
            if not 0 <= getattr(self, name) <= most.get(name, 2**62):
                raise UsageError(f"{name} must be 0..{most.get(name, 2**62):,}, got {getattr(self, name)}")
        if self.head != "linear":
            raise UsageError(f"training trains a linear head; --head {self.head} is for a model that is not trained "
                             "(`uniret model init --head ...`)")
        if self.freeze_backbone and self.train_blocks is not None:
            raise UsageError("--freeze-backbone freezes all of it; --train-blocks N trains the last N stages: choose one")
        if self.train_blocks is not None and not 1 <= self.train_blocks <= 1_000:
            raise UsageError(f"train_blocks must be 1..1,000 stages, got {self.train_blocks}")
        if not 1 <= self.cache_views <= 1_000:
            raise UsageError(f"cache_views must be 1..1,000, got {self.cache_views}")
        if self.cache_dtype not in ("float16", "float32"):
            raise UsageError(f"cache_dtype must be float16 or float32, not {self.cache_dtype!r}")
        if self.nested_dims is not None:
            dims = sorted({int(d) for d in self.nested_dims})
            if not dims or dims[0] < 1 or dims[-1] > self.dim:
                raise UsageError(f"nested_dims {self.nested_dims} must lie in 1..{self.dim} (--dim)")
            self.nested_dims = dims if dims[-1] == self.dim else [*dims, self.dim]
        if self.batch_size < 2:
            raise UsageError("batch_size must be at least 2 (the relational loss compares images)")
        for name in ("seed", "cache_seed"):
            if not 0 <= getattr(self, name) < 2**63:
                raise UsageError(f"{name} must be 0..2^63-1, got {getattr(self, name)}")
        self._check_numbers()
        for spec, where in [(self.augment, "augment"),
                            *((v, f"augment_domains[{k!r}]") for k, v in self.augment_domains.items())]:
            check_spec(spec, where)
        return self

    def _check_numbers(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        floats = [f.name for f in dataclasses.fields(self) if f.type in ("float", "float | None")]
        for name in floats:
            value = getattr(self, name)
            need(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")
        need(self.head_lr > 0, f"head_lr must be positive, got {self.head_lr}")
        need(self.backbone_lr >= 0, f"backbone_lr must be 0 (frozen) or positive, got {self.backbone_lr}")
        need(self.weight_decay >= 0 and self.eps > 0, "weight_decay must be 0 or more and eps positive")
        need(all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        need(self.distill_temperature > 0 and self.cls_scale > 0, "distill_temperature and cls_scale must be positive")
        need(0.0 <= self.cls_margin < 1.0, f"cls_margin must be in [0, 1), got {self.cls_margin}")
        need(self.relational_factor >= 0, f"relational_factor must be 0 or more, got {self.relational_factor}")
        weights = (self.weight_cls_teacher, self.weight_cls_student, self.weight_logit, self.weight_relational)
        need(min(weights) >= 0 and sum(weights) > 0, "the loss weights weight_* must be 0 or more, and not all 0")
        for name in ("backbone_freeze_fraction", "warmup_fraction", "backbone_warmup_fraction", "min_lr_ratio"):
            value = getattr(self, name)
            need(value is None or 0.0 <= value <= 1.0, f"{name} must be between 0 and 1, got {value}")
        need(self.crop_pct is None or 0.0 < self.crop_pct <= 1.0, f"crop_pct must be in (0, 1], got {self.crop_pct}")
        for name in ("lr_schedule", "backbone_lr_schedule"):
            value = getattr(self, name)
            need(value is None or value in LR_SCHEDULES, f"{name} must be one of {', '.join(LR_SCHEDULES)}, got {value!r}")
        need(all(0.0 < m < 1.0 for m in self.step_milestones), f"step_milestones must be fractions in (0, 1), got {self.step_milestones}")
        need(0.0 < self.step_gamma <= 1.0, f"step_gamma must be in (0, 1], got {self.step_gamma}")
        need(self.time_budget is None or 0 < self.time_budget <= MAX_TIME_BUDGET,
             f"time_budget must be minutes in (0, {MAX_TIME_BUDGET:,}] (a year), got {self.time_budget}")
        need(self.grad_clip_norm is None or self.grad_clip_norm > 0, f"grad_clip_norm must be positive, got {self.grad_clip_norm}")
        need(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}")
        need(self.image_size is None or 8 <= self.image_size <= 4096, f"image_size must be 8..4096 pixels, got {self.image_size}")

    @property
    def frozen_part(self) -> bool:
        """Whether part of the backbone is frozen (and, with ``cache_features``, cached)."""
        return self.freeze_backbone or self.train_blocks is not None

    @property
    def freeze_steps(self) -> int:
        """Number of first steps during which the backbone learning rate is 0."""
        return int(round(self.backbone_freeze_fraction * self.steps))


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}


def _typed(name: str, annotation: str, value):
    """``value`` checked against a field annotation (as written: "int", "float | None",
    "list[int] | None", "tuple[float, float]", ...); ints are accepted where floats are."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise UsageError(f"option {name} cannot be null")
    if kind in _SCALARS:
        return _scalar(name, _SCALARS[kind], value)
    item = float if "float" in kind else int
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"option {name} must be a list of numbers, not {value!r}")
    return [_scalar(name, item, v) for v in value]


def _scalar(name: str, kind: type, value):
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UsageError(f"option {name} must be {_NAMES[kind]}, not {value!r}")
    return value


def load_config_file(path: str | Path) -> dict:
    """Read a ``--config`` JSON file (an object of TrainConfig field names)."""
    p = Path(path)
    try:
        obj = read_json(p, "config file", max_bytes=1 << 20)
    except FileNotFoundError:
        raise UniretError(f"{p}: config file not found") from None
    except OSError as exc:
        raise UniretError(f"{p}: cannot read the config file ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(obj, dict):
        raise UniretError(f"{p}: a config file holds a JSON object of training options")
    return obj


def resolve_config(file: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults < config file < explicit options (None-valued overrides are dropped)."""
    values = load_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_json(values).validate()


#: A recipe that learns on the demo collection in about a minute or two on a 2-core CPU (measured:
#: see docs/TRAINING.md). The backbone starts from random weights (no downloads), so it trains at the
#: heads' learning rate from the first step instead of the reference's frozen-then-1e-5 schedule.
DEMO_RECIPE: dict = {
    "backbone": "timm:test_resnet",
    "image_size": 64,
    "steps": 300,
    "batch_size": 32,
    "head_lr": 3e-3,
    "backbone_lr": 3e-3,
    "backbone_freeze_fraction": 0.0,
    "dynamic_interval": 50,
    "dynamic_window": 50,
    "val_every": 100,
    "ckpt_every": 100,
    "log_every": 25,
}


def demo_config(data: str | Path, out: str | Path, **overrides) -> TrainConfig:
    """The :data:`DEMO_RECIPE` on ``data`` written to ``out`` (overrides win)."""
    values = {**DEMO_RECIPE, "data": str(data), "out": str(out), **overrides}
    return TrainConfig.from_json(values).validate()
