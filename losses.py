"""Training losses: the single-label criterion (mixup / label smoothing aware), DeiT-style distillation, the
metric-learning losses on L2-normalised style vectors (ArcFace, sub-centre ArcFace, supervised contrastive), and the
per-label positive weights of multi-label training."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

import utils

__all__ = ["DISTILLATION_TYPES", "LOSSES", "METRIC_LOSSES", "ArcFaceLoss", "DistillationLoss", "StyleEmbeddingLoss",
           "SupConLoss", "build_classification_criterion", "multilabel_pos_weight"]

DISTILLATION_TYPES = ("none", "soft", "hard")
METRIC_LOSSES = ("arcface", "subcenter-arcface", "supcon")
LOSSES = ("ce", *METRIC_LOSSES)


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


def _average_grad_over_processes(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook: the mean over processes (what DDP does for the model's parameters)."""
    world_size = utils.get_world_size()
    return utils.all_reduce_sum(grad.clone()) / world_size if world_size > 1 else grad


class ArcFaceLoss(nn.Module):
    """ArcFace (additive angular margin) on L2-normalised vectors; sub-centre ArcFace with ``subcenters`` > 1.

    Each class has ``subcenters`` learnable unit proxies; an image's cosine to a class is its best sub-centre's.
    The target class's angle gets ``margin`` (radians) added, then cross-entropy on ``scale`` x cosines. The
    proxies' gradients are averaged over processes (they live outside the DDP-wrapped model).
    """

    def __init__(self, num_classes: int, dim: int, scale: float = 30.0, margin: float = 0.3, subcenters: int = 1):
        super().__init__()
        if subcenters < 1:
            raise ValueError(f"subcenters must be at least 1, got {subcenters}")
        self.num_classes, self.scale, self.margin, self.subcenters = num_classes, scale, margin, subcenters
        self.proxies = nn.Parameter(torch.randn(num_classes * subcenters, dim) / math.sqrt(dim))
        self.proxies.register_hook(_average_grad_over_processes)

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """(N, classes) cosine of each normalised vector to each class (its nearest sub-centre)."""
        cos = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.proxies.float(), dim=1))
        return cos.view(-1, self.num_classes, self.subcenters).amax(dim=2)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(features)
        target_cos = cos.gather(1, targets[:, None]).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(target_cos)
        # Past pi - margin cos(theta + m) would rise again: use the linear continuation (as in InsightFace).
        with_margin = torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin),
                                  target_cos - self.margin * math.sin(self.margin))
        logits = cos.scatter(1, targets[:, None], with_margin) * self.scale
        return F.cross_entropy(logits, targets)


def _gather_batches(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every process's vectors and targets, concatenated in rank order (gradients flow back to each process's own
    rows), and where this process's rows start; the inputs themselves when not distributed."""
    world_size = utils.get_world_size()
    if world_size == 1:
        return z, targets, 0
    size = torch.tensor([z.shape[0]], device=z.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - z.shape[0]  # all_gather needs equal shapes: pad, then drop the padding rows
    padded_targets = F.pad(targets, (0, pad), value=-1)
    all_targets = [torch.empty_like(padded_targets) for _ in range(world_size)]
    torch.distributed.all_gather(all_targets, padded_targets)
    from torch.distributed.nn.functional import all_gather  # keeps gradients; only where distributed is available

    all_z = all_gather(F.pad(z, (0, 0, 0, pad)))
    rank = utils.get_rank()
    return (torch.cat([v[:n] for v, n in zip(all_z, sizes, strict=True)]),
            torch.cat([t[:n] for t, n in zip(all_targets, sizes, strict=True)]), sum(sizes[:rank]))


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020) of the normalised vectors of one batch at ``temperature``.

    Every image with another image of its class in the batch is an anchor; its loss is the mean negative log
    probability of its positives among all other images. Under DDP the batch is every process's batch: each
    process's anchors are contrasted with all processes' vectors (gathered with gradients), and the loss is scaled
    so that DDP's mean over processes is the mean over all anchors. Use ``--sampler class-balanced`` so every batch
    holds several images per class.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = F.normalize(features.float(), dim=1)
        all_z, all_targets, offset = _gather_batches(z, targets)
        n = z.shape[0]
        self_mask = torch.zeros(n, all_z.shape[0], dtype=torch.bool, device=z.device)
        self_mask[torch.arange(n, device=z.device), torch.arange(n, device=z.device) + offset] = True
        logits = (z @ all_z.T / self.temperature).masked_fill(self_mask, float("-inf"))
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
        positives = (targets[:, None] == all_targets[None, :]) & ~self_mask
        counts = positives.sum(1)
        anchors = counts > 0
        all_anchors = int(((all_targets[:, None] == all_targets[None, :]).sum(1) > 1).sum())
        if not all_anchors:  # no pair in the batch: a zero loss that keeps the graph
            return z.sum() * 0.0
        per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / counts[anchors]
        return per_anchor.sum() * utils.get_world_size() / all_anchors


class StyleEmbeddingLoss(nn.Module):
    """Training criterion of a metric loss: the loss on the style vectors, plus a linear probe.

    Called with the style vectors (the model's ``forward(x, return_features=True)``). The classifier head is
    trained as a probe on the detached vectors (cross-entropy, no gradient into the network), so the head still
    gives class probabilities and ``--eval`` accuracy, while the embedding is shaped by the metric loss alone.
    """

    needs_features = True

    def __init__(self, metric: nn.Module, head: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.metric = metric
        self.head = head  # the model's classifier (a bound method: not registered, its weights stay the model's)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probe = F.cross_entropy(self.head(features.detach()).float(), targets)
        return self.metric(features, targets) + probe
