"""Distillation as in DeiT: a frozen teacher in eval mode adds a soft (KL at temperature tau) or
hard (cross-entropy on the teacher's argmax) term, weighted by alpha, to the student's loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from t2t_vit.modelsource import ModelSource
from t2t_vit.train.config import ValidConfig


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base(student, target) + alpha * teacher term``."""

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, images: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        base = self.base(logits, target)
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        if self.kind == "soft":
            tau = self.tau
            kd = F.kl_div(F.log_softmax(logits.float() / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                          reduction="batchmean", log_target=True) * tau * tau
        else:
            kd = F.cross_entropy(logits.float(), teacher_logits.argmax(dim=-1))
        return (1 - self.alpha) * base + self.alpha * kd


def build_teacher(cfg: ValidConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The teacher from one of our checkpoints (architecture read from its metadata), a model name
    with ``teacher_checkpoint``, or a model name or tag alone: its released weights; frozen, in eval
    mode. A name alone never builds random weights: a teacher with random weights teaches noise."""
    from t2t_vit.checkpoint import load_checkpoint
    from t2t_vit.checkpoint import model_from_checkpoint
    from t2t_vit.train.recipe import build_model

    if cfg.teacher_source.kind == "file":
        teacher = model_from_checkpoint(cfg.teacher)
    elif not cfg.teacher_checkpoint:
        teacher = pretrained_teacher(cfg.teacher_source, num_classes)
    else:
        teacher = build_model(cfg, num_classes, name=cfg.teacher_source.model, kwargs={})
        report = load_checkpoint(teacher, cfg.teacher_checkpoint)
        if report.replaced_head:  # a teacher with a fresh head would teach noise
            raise T2TViTError(f"--teacher-checkpoint {cfg.teacher_checkpoint} has a {report.replaced_head[0]}-class "
                              f"head but the data set has {report.replaced_head[1]} classes")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def pretrained_teacher(source: ModelSource, num_classes: int) -> nn.Module:
    """The released weights of a model name or tag (T2T-ViT or any timm model), downloaded on request;
    refused when its classes are not the data set's."""
    import timm

    import t2t_vit
    from t2t_vit.table import is_t2t_vit

    name = source.text
    create = t2t_vit.create_model if source.kind == "tag" or is_t2t_vit(source.model) else timm.create_model
    try:
        teacher = create(name, pretrained=True)
    except RuntimeError as err:  # timm: no pretrained weights registered for this name
        raise T2TViTError(f"--teacher {name} has no released weights to teach with; give --teacher-checkpoint "
                          f"or a checkpoint file ({' '.join(str(err).split())})") from err
    if teacher.num_classes != num_classes:
        raise T2TViTError(f"--teacher {name} predicts {teacher.num_classes} classes but the data set has "
                          f"{num_classes}; fine-tune a teacher on this data and pass its checkpoint")
    return teacher
