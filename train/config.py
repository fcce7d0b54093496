"""Training configuration: one typed dataclass whose defaults are the reference recipe (METHOD.md §3).

A run is configured by, in increasing priority: these defaults, an optional JSON file
(``--config FILE``, keys = field names), and the explicit CLI options. The resolved config is
written to ``RUN/config.json`` and a resumed run checks that it still matches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UniretError
from .methods import method_class
from .samplers import SAMPLERS

ABSENT_HEAD_POLICIES = ("update", "skip")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults follow the UDON reference recipe."""

    # -- what to train on and where to write ----------------------------------------------------
    data: str = ""
    out: str = ""
    method: str = "udon"
    domain: str | None = None  # the one domain of --method specialist
    sampler: str | None = None  # None: the method's (udon dynamic, uscrr round_robin, ujc size)
    # -- model (the options of `uniret model init`) -------------------------------------------------
    backbone: str = "timm:vit_base_patch16_224"
    pretrained: bool = False
    weights: str | None = None
    image_size: int | None = None
    pool: str | None = None  # CNN pooling, e.g. "gem" or "gem:4.6"; None = the backbone's
    crop_pct: float | None = None  # eval crop; 1.0 = the reference's (short side to size, centre crop)
    dim: int = 64  # universal (student) embedding
    # Matryoshka (METHOD.md §6): prefix sizes of the student embedding that are trained to be usable
    # on their own, e.g. [8, 16, 32, 64]; None = no nesting.
    nested_dims: list[int] | None = None
    teacher_dim: int = 256
    # -- schedule ---------------------------------------------------------------------------------
    steps: int = 1000
    batch_size: int = 128  # global batch (split over ranks under torchrun)
    seed: int = 0
    # -- optimiser (AdamW, two parameter groups, constant learning rates) ------------------------
    head_lr: float = 1e-3  # heads and classifiers
    backbone_lr: float = 1e-5
    backbone_freeze_fraction: float = 0.2  # backbone lr is 0 for this first part (2 of 10 epochs)
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # "update": heads of domains absent from a step get a zero gradient, so AdamW still moves them
    # with their decaying moments and weight decay, as the reference (optax) optimiser does.
    # "skip": their gradient is None and PyTorch's AdamW leaves them and their state untouched.
    absent_heads: str = "update"
    # -- losses -----------------------------------------------------------------------------------
    cls_scale: float = 16.0  # normalised softmax scale, teacher and student
    distill_temperature: float = 0.1
    relational_factor: float = 0.25  # L_rel = (factor * B) * mean((S_u - S_t)^2), B/4 in the paper
    weight_cls_teacher: float = 0.25  # L = (L_cls_t + L_cls_u + L_log + L_rel) / 4
    weight_cls_student: float = 0.25
    weight_logit: float = 0.25
    weight_relational: float = 0.25
    # False: e_b is detached for L_log and L_rel, so distillation trains the student head and its
    # classifier but not the backbone (an ablation; the reference distils into the backbone too).
    distill_to_backbone: bool = True
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
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.json

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @staticmethod
    def from_json(obj: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise UniretError(
                f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(obj)
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return TrainConfig(**values)

    def validate(self) -> TrainConfig:
        """Raise a one-line :class:`UniretError` for options that cannot work together."""
        if not self.data:
            raise UniretError("no training data: pass --data ROOT|LMDB")
        if not self.out:
            raise UniretError("no run directory: pass --out RUN")
        method = method_class(self.method)
        method.check_config(self)
        if self.sampler is None:
            self.sampler = method.default_sampler
        if self.sampler not in SAMPLERS:
            raise UniretError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.absent_heads not in ABSENT_HEAD_POLICIES:
            raise UniretError(f"absent_heads must be one of {', '.join(ABSENT_HEAD_POLICIES)}")
        if self.amp not in ("auto", "bf16", "off"):
            raise UniretError(f"amp must be auto, bf16 or off, not {self.amp!r}")
        for name in ("steps", "batch_size", "dim", "teacher_dim", "dynamic_interval", "dynamic_window",
                     "val_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise UniretError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("val_every", "ckpt_every", "workers"):
            if getattr(self, name) < 0:
                raise UniretError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.nested_dims is not None:
            dims = sorted({int(d) for d in self.nested_dims})
            if not dims or dims[0] < 1 or dims[-1] > self.dim:
                raise UniretError(f"nested_dims {self.nested_dims} must lie in 1..{self.dim} (--dim)")
            self.nested_dims = dims if dims[-1] == self.dim else [*dims, self.dim]
        if self.batch_size < 2:
            raise UniretError("batch_size must be at least 2 (the relational loss compares images)")
        if not 0.0 <= self.backbone_freeze_fraction <= 1.0:
            raise UniretError("backbone_freeze_fraction must be between 0 and 1")
        if self.distill_temperature <= 0 or self.cls_scale <= 0:
            raise UniretError("distill_temperature and cls_scale must be positive")
        weights = (self.weight_cls_teacher, self.weight_cls_student, self.weight_logit, self.weight_relational)
        if min(weights) < 0 or sum(weights) <= 0:
            raise UniretError("the loss weights weight_* must be 0 or more, and not all 0")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise UniretError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        return self

    @property
    def freeze_steps(self) -> int:
        """Number of first steps during which the backbone learning rate is 0."""
        return int(round(self.backbone_freeze_fraction * self.steps))


def load_config_file(path: str | Path) -> dict:
    """Read a ``--config`` JSON file (an object of TrainConfig field names)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise UniretError(f"{p}: config file not found") from None
    except json.JSONDecodeError as exc:
        raise UniretError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
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
