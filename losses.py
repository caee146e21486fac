"""Training losses: the single-label criterion (mixup / label smoothing aware), DeiT-style distillation, and the
per-label positive weights of multi-label training."""

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

__all__ = ["DISTILLATION_TYPES", "DistillationLoss", "build_classification_criterion", "multilabel_pos_weight"]

DISTILLATION_TYPES = ("none", "soft", "hard")


def build_classification_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    """Soft-target CE when mixup/cutmix make the targets soft (smoothing is applied by the mixup), else CE with
    label smoothing (plain CE when ``smoothing`` is 0)."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """DeiT distillation: the base criterion on the class head, plus a teacher term on the distillation head.

    ``loss = (1 - alpha) * base(out, target) + alpha * distill(out_dist, teacher(inputs))``, where ``distill`` is
    ``soft``: KL divergence of the temperature-``tau`` softmaxes (scaled by ``tau**2``), or ``hard``: cross-entropy
    with the teacher's arg-max. With ``none`` the loss is the base criterion alone (on the class head).
    The student returns ``(out, out_dist)`` in training mode when it was built with ``distillation=True``.
    """

    def __init__(self, base_criterion: nn.Module, teacher: nn.Module | None, distillation_type: str = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"distillation_type {distillation_type!r} needs a teacher model")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def train(self, mode: bool = True) -> "DistillationLoss":
        """The teacher stays in eval mode (frozen BatchNorm statistics, no dropout)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError("distillation needs a student built with distillation=True (outputs (out, out_dist))")
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == "soft":
            tau = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher_outputs / tau, dim=1),
                reduction="sum", log_target=True,
            ) * (tau * tau) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def multilabel_pos_weight(positives: torch.Tensor, num_samples: int, max_weight: float = 10.0) -> torch.Tensor:
    """``pos_weight`` of ``BCEWithLogitsLoss``: per label, negatives / positives among ``num_samples`` training rows.

    Clipped to ``[1 / max_weight, max_weight]``, so a label seen once (or never) does not dominate the loss.
    """
    if max_weight < 1:
        raise ValueError(f"max_weight must be at least 1, got {max_weight}")
    positives = positives.double()
    return ((num_samples - positives) / positives.clamp(min=1e-12)).clamp(1 / max_weight, max_weight).float()
