"""Training methods as objects: each owns its heads, its label space, its losses and the loss the
dynamic sampler follows (METHOD.md §3).

=============  ====================================================================  ===============
method         heads and losses                                                      default sampler
=============  ====================================================================  ===============
udon           per-domain teacher heads + teacher and student classifiers; L_cls_t,  dynamic
               L_cls_u, L_log, L_rel (weights normalised by their sum)
uscrr          per-domain student classifiers; L_cls_u                               round_robin
ujc            one joint student classifier over all domains' classes; L_cls_u       size
specialist     uscrr on the one domain of ``--domain``                               round_robin
=============  ====================================================================  ===============

A fifth method is one class here (decorated with :func:`register`) plus its tests: the trainer,
the config checks and the CLI's ``--method`` choices read :data:`METHODS`. This module imports
torch only inside methods, so that the CLI can list the methods without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import TrainConfig
    from .distributed import DistContext
    from .model import Heads, TrainingModel

#: Every training method by name, in the order the CLI lists them.
METHODS: dict[str, type[TrainingMethod]] = {}


def register(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[TrainingMethod]:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


class TrainingMethod:
    """Base: per-domain student cosine classifiers and the student's classification loss."""

    name: ClassVar[str]
    help: ClassVar[str]
    default_sampler: ClassVar[str] = "round_robin"
    sampler_loss: ClassVar[str] = "cls_student"  # the loss the dynamic sampler follows

    def __init__(self, config: TrainConfig, num_classes: list[int]):
        self.config = config
        self.num_classes = list(num_classes)

    # -- configuration ---------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Raise a one-line error for options this method cannot use."""
        if config.domain:
            raise UsageError(f"--domain is only for --method specialist; drop it or change --method {cls.name}")

    @classmethod
    def training_domains(cls, config: TrainConfig) -> list[str] | None:
        """The domains to train on; None = every domain with a train split."""
        return None

    # -- heads and label space -------------------------------------------------------------------
    def build_heads(self, feature_dim: int, dim: int) -> Heads:
        from .model import CosineClassifier, Heads

        heads = Heads()
        for c in self.num_classes:
            heads.student_classifiers.append(CosineClassifier(dim, c))
        return heads

    def classifier_labels(self, domain: int, labels: torch.Tensor) -> torch.Tensor:
        """Labels in the space of the classifier that ``domain``'s batches train."""
        return labels

    def student_classifier(self, heads: Heads, domain: int) -> nn.Module:
        return heads.student_classifiers[domain]

    def domain_parameters(self, heads: Heads, domain: int) -> list[nn.Parameter]:
        """Parameters that belong to one domain only."""
        return list(heads.student_classifiers[domain].parameters())

    # -- forward and losses ------------------------------------------------------------------------
    def student_outputs(self, model: TrainingModel, student: torch.Tensor, domain: int) -> dict:
        """The student embedding, its cosines and, with Matryoshka nesting, those of every prefix."""
        classifier = self.student_classifier(model.heads, domain)
        out = {"student": student, "student_cosines": classifier(student)}
        nested = model.nested_dims
        if len(nested) > 1:  # the last nested size is the full embedding, already above
            out["student_prefix_cosines"] = [classifier.prefix(student, m) for m in nested[:-1]]
        return out

    def forward(self, model: TrainingModel, features: torch.Tensor, student: torch.Tensor, domain: int) -> dict:
        return self.student_outputs(model, student, domain)

    def losses(self, out: dict, labels: torch.Tensor, ctx: DistContext) -> dict[str, torch.Tensor]:
        """The method's losses; ``loss`` is what is minimised."""
        from .losses import classifier_only_losses

        return classifier_only_losses(out, labels, cls_scale=self.config.cls_scale, cls_margin=self.config.cls_margin)


@register
class Udon(TrainingMethod):
    """Online multi-teacher distillation: per-domain teachers on the shared backbone (METHOD.md §3)."""

    name = "udon"
    help = "UDON: per-domain teachers distilled online into the universal student"
    default_sampler = "dynamic"
    sampler_loss = "cls_teacher"

    def build_heads(self, feature_dim: int, dim: int) -> Heads:
        from torch import nn

        from .model import CosineClassifier, reference_init

        heads = super().build_heads(feature_dim, dim)
        for c in self.num_classes:
            heads.teacher_heads.append(reference_init(nn.Linear(feature_dim, self.config.teacher_dim)))
            heads.teacher_classifiers.append(CosineClassifier(self.config.teacher_dim, c))
        return heads

    def domain_parameters(self, heads: Heads, domain: int) -> list[nn.Parameter]:
        return [*heads.teacher_heads[domain].parameters(), *heads.teacher_classifiers[domain].parameters(),
                *super().domain_parameters(heads, domain)]

    def forward(self, model: TrainingModel, features: torch.Tensor, student: torch.Tensor, domain: int) -> dict:
        import torch.nn.functional as F

        out = self.student_outputs(model, student, domain)
        teacher = F.normalize(model.heads.teacher_heads[domain](features), dim=-1)  # e_t
        out["teacher"] = teacher
        out["teacher_cosines"] = model.heads.teacher_classifiers[domain](teacher)
        if not self.config.distill_to_backbone:
            # The distillation losses see a student computed from a detached e_b: their gradients
            # train the student head and classifier but stop at the backbone.
            distill = model.embedder.embed_features(features.detach())
            out["distill_student"] = distill
            out["distill_student_cosines"] = self.student_classifier(model.heads, domain)(distill)
        return out

    def losses(self, out: dict, labels: torch.Tensor, ctx: DistContext) -> dict[str, torch.Tensor]:
        from .distributed import gather_detached, gather_with_grad
        from .losses import udon_losses

        c = self.config
        gathered = None
        if ctx.enabled:  # the relational loss compares the images of the GLOBAL batch
            student = out.get("distill_student", out["student"])
            gathered = (gather_with_grad(student, ctx), gather_detached(out["teacher"], ctx))
        return udon_losses(
            out, labels, cls_scale=c.cls_scale, cls_margin=c.cls_margin, temperature=c.distill_temperature,
            relational_factor=c.relational_factor, gathered=gathered,
            weights=(c.weight_cls_teacher, c.weight_cls_student, c.weight_logit, c.weight_relational),
        )


@register
class Uscrr(TrainingMethod):
    """The UnED reference: universal head, separate per-domain classifiers, round-robin sampling."""

    name = "uscrr"
    help = "USCRR: separate per-domain classifiers on the universal head"


@register
class Ujc(TrainingMethod):
    """One joint classifier over the classes of all domains (labels offset per domain)."""

    name = "ujc"
    help = "UJC: one joint classifier over every domain's classes"
    default_sampler = "size"

    def __init__(self, config: TrainConfig, num_classes: list[int]):
        super().__init__(config, num_classes)
        self.label_offsets = [sum(self.num_classes[:i]) for i in range(len(self.num_classes))]

    def build_heads(self, feature_dim: int, dim: int) -> Heads:
        from .model import CosineClassifier, Heads

        heads = Heads()
        heads.student_classifiers.append(CosineClassifier(dim, sum(self.num_classes)))
        return heads

    def classifier_labels(self, domain: int, labels: torch.Tensor) -> torch.Tensor:
        return labels + self.label_offsets[domain]

    def student_classifier(self, heads: Heads, domain: int) -> nn.Module:
        return heads.student_classifiers[0]

    def domain_parameters(self, heads: Heads, domain: int) -> list[nn.Parameter]:
        return []  # the joint classifier is shared by every domain


@register
class Specialist(TrainingMethod):
    """USCRR on one domain (``--domain D``); one per domain + the domain label at query time is the
    "Specialist + Oracle" reference."""

    name = "specialist"
    help = "one domain only (--domain D): the Specialist + Oracle reference"

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if not config.domain:
            raise UsageError("--method specialist trains one domain: pass --domain D")

    @classmethod
    def training_domains(cls, config: TrainConfig) -> list[str] | None:
        return [config.domain]


@register
class UdonJoint(Udon, Ujc):
    """UDON's per-domain teachers distilled into a student whose classifier is UJC's: one joint
    classifier over every domain's classes. L_log compares a teacher with the student's cosines to
    its own domain's classes (a slice of the joint classifier). Through the method resolution order,
    Udon adds the teachers to Ujc's heads, and Ujc gives the label offsets and the joint classifier."""

    name = "udon_joint"
    help = "UDON teachers distilled into a student with one joint classifier over every domain's classes"

    def forward(self, model: TrainingModel, features: torch.Tensor, student: torch.Tensor, domain: int) -> dict:
        out = super().forward(model, features, student, domain)
        lo = self.label_offsets[domain]
        out["span"] = (lo, lo + self.num_classes[domain])
        return out

    def losses(self, out: dict, labels: torch.Tensor, ctx: DistContext) -> dict[str, torch.Tensor]:
        lo, hi = out["span"]
        sliced = dict(out)
        # the teacher classifies in its domain's label space; L_log sees the student's slice of it
        sliced["distill_student_cosines"] = out.get("distill_student_cosines", out["student_cosines"])[:, lo:hi]
        sliced["teacher_labels"] = labels - lo
        return super().losses(sliced, labels, ctx)
