"""The UDON losses (METHOD.md §3), as plain functions on one single-domain batch.

Inputs are already L2-normalised embeddings and raw cosine logits (cosine classifiers). The teacher
side of both distillation losses is detached here, so a caller cannot forget the stop-gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(cosines: torch.Tensor, labels: torch.Tensor, scale: float = 16.0,
                        margin: float = 0.0) -> torch.Tensor:
    """Normalised-softmax cross-entropy: ``CE(scale * cos, y)``, averaged over the batch. With
    ``margin`` m > 0 the target cosine is lowered by m first (CosFace's additive margin): each class
    must win by m, which tightens the classes of the embedding."""
    cosines = cosines.float()
    if margin:
        cosines = cosines - margin * F.one_hot(labels, cosines.shape[1]).to(cosines.dtype)
    return F.cross_entropy(scale * cosines, labels)


def student_classification_loss(out: dict, labels: torch.Tensor, scale: float = 16.0,
                                margin: float = 0.0) -> torch.Tensor:
    """The student's normalised-softmax loss; with Matryoshka prefixes (``student_prefix_cosines``)
    the mean of that loss over the full embedding and every nested prefix (METHOD.md §6)."""
    losses = [classification_loss(out["student_cosines"], labels, scale, margin)]
    losses += [classification_loss(c, labels, scale, margin) for c in out.get("student_prefix_cosines", ())]
    return torch.stack(losses).mean() if len(losses) > 1 else losses[0]


def logit_distillation(
    teacher_cosines: torch.Tensor, student_cosines: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """``mean_b KL(softmax(sg(z_t)/T) || softmax(z_u/T))``, summed over classes, no T^2 factor."""
    log_p_teacher = F.log_softmax(teacher_cosines.detach().float() / temperature, dim=1)
    log_p_student = F.log_softmax(student_cosines.float() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean()


def relational_distillation(
    student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, factor: float = 0.25
) -> torch.Tensor:
    """``(factor * B) * mean((E_u E_u^T - sg(E_t E_t^T))^2)`` over the B x B cosine matrices.

    Under DDP the caller passes the gathered global batch, so B is the global batch size.
    """
    student = student_embeddings.float()
    teacher = teacher_embeddings.detach().float()
    batch = student.shape[0]
    sim_student = student @ student.T
    sim_teacher = teacher @ teacher.T
    return (factor * batch) * (sim_student - sim_teacher).pow(2).mean()


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum_i w_i L_i / sum_i w_i``: the weights are normalised by their sum, as in the reference, so
    an ablation that zeroes one weight averages the remaining losses (weights 1,1,1,0 -> mean of 3)."""
    total = sum(weights.values())
    return sum(w * losses[name] for name, w in weights.items() if w) / total


def udon_losses(
    out: dict,
    labels: torch.Tensor,
    *,
    cls_scale: float = 16.0,
    cls_margin: float = 0.0,
    temperature: float = 0.1,
    relational_factor: float = 0.25,
    weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25),
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """All four UDON losses and their weighted mean ``loss`` (weights normalised by their sum).

    ``out`` holds ``student_cosines``, ``teacher_cosines``, ``student`` and ``teacher`` embeddings
    (see :class:`~uniret.train.methods.Udon`); ``distill_student`` / ``distill_student_cosines``,
    when present, are the student computed from a detached e_b and feed the two distillation losses
    (distillation stopped at the backbone). ``gathered`` = (student, teacher) embeddings of the global
    batch under DDP; the relational loss uses them instead of the local ones.
    """
    cls_t = classification_loss(out["teacher_cosines"], out.get("teacher_labels", labels), cls_scale, cls_margin)
    cls_u = student_classification_loss(out, labels, cls_scale, cls_margin)
    log = logit_distillation(out["teacher_cosines"], out.get("distill_student_cosines", out["student_cosines"]),
                             temperature)
    student, teacher = gathered if gathered is not None else (out.get("distill_student", out["student"]),
                                                              out["teacher"])
    rel = relational_distillation(student, teacher, relational_factor)
    losses = {"cls_teacher": cls_t, "cls_student": cls_u, "logit": log, "relational": rel}
    losses["loss"] = weighted_total(losses, dict(zip(("cls_teacher", "cls_student", "logit", "relational"), weights)))
    return losses


def classifier_only_losses(out: dict, labels: torch.Tensor, *, cls_scale: float = 16.0,
                           cls_margin: float = 0.0) -> dict[str, torch.Tensor]:
    """USCRR / UJC / specialist: the student's normalised-softmax loss alone."""
    cls_u = student_classification_loss(out, labels, cls_scale, cls_margin)
    return {"loss": cls_u, "cls_student": cls_u}
