"""Validation metrics: single-label top-k accuracy and the multi-label precision / recall / F1 / mAP family."""

from collections.abc import Sequence
from typing import Protocol

import torch
from timm.utils import accuracy

import utils

__all__ = ["Metric", "MultiLabelMetrics", "TopKAccuracy", "average_precision"]


class Metric(Protocol):
    """Validation metric accumulated over batches: ``update`` per batch, ``compute`` once at the end."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None: ...

    def compute(self, distributed: bool = False) -> dict[str, float]:
        """Final values; with ``distributed`` the batches of every process are combined."""
        ...


class TopKAccuracy:
    """Single-label top-k accuracy in percent (``acc1``, ``acc5``); k is capped at the number of classes."""

    def __init__(self, topk: Sequence[int] = (1, 5)):
        self.topk = tuple(topk)
        self.correct = torch.zeros(len(self.topk), dtype=torch.float64)
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        batch = target.shape[0]  # timm's accuracy: percent of the batch per k (k capped at the class count)
        counts = torch.stack([percent.double() * batch / 100 for percent in accuracy(output, target, self.topk)])
        self.correct = self.correct.to(output.device) + counts.round()
        self.count += batch

    def compute(self, distributed: bool = False) -> dict[str, float]:
        totals = torch.cat([self.correct, self.correct.new_tensor([self.count])])
        if distributed:
            utils.all_reduce_sum(totals)
        correct, count = totals[:-1].tolist(), max(totals[-1].item(), 1)
        return {f"acc{k}": 100.0 * c / count for k, c in zip(self.topk, correct, strict=True)}


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each column of ``scores`` (N, C) against the boolean ``targets`` (N, C).

    scikit-learn's definition: the sum over decreasing score thresholds of (recall increase) x precision, with tied
    scores forming one threshold. NaN for a column without a positive.
    """
    n = scores.shape[0]
    order = scores.argsort(dim=0, descending=True, stable=True)
    sorted_scores = scores.gather(0, order)
    hits = targets.gather(0, order).double()
    precision = hits.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    # Tied scores are one threshold: every position takes the precision at the end of its run of equal scores.
    positions = torch.arange(n).unsqueeze(1).expand_as(sorted_scores)
    run_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    run_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end_index = torch.where(run_end, positions, n).flip(0).cummin(dim=0).values.flip(0)
    return (hits * precision.gather(0, end_index)).sum(0) / hits.sum(0)


class MultiLabelMetrics:
    """Multi-label metrics on label presence (target > 0), from sigmoid scores; fractions in [0, 1].

    ``map_micro``/``map_macro``: average precision over all (image, label) pairs / mean per-label AP, where labels
    without a positive in the evaluated split are left out of every macro value (``labels_without_positives``
    counts them). ``precision``/``recall``/``f1`` ``_micro``/``_macro`` at ``threshold``: micro sums the counts
    over all labels; macro averages the per-label values (precision 0 for a label never predicted).
    """

    def __init__(self, threshold: float = 0.4):
        self.threshold = threshold
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.scores.append(output.detach().float().sigmoid().cpu())
        self.targets.append((target > 0).cpu())

    def compute(self, distributed: bool = False) -> dict[str, float]:
        parts = [(self.scores, self.targets)]
        if distributed:
            parts = utils.all_gather_objects(parts[0])
        scores = torch.cat([batch for process_scores, _ in parts for batch in process_scores])
        targets = torch.cat([batch for _, process_targets in parts for batch in process_targets])
        present = targets.any(dim=0)
        predicted = scores >= self.threshold
        tp = (predicted & targets).sum(0).double()
        fp = (predicted & ~targets).sum(0).double()
        fn = (~predicted & targets).sum(0).double()

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            return torch.where(den > 0, num / den.clamp(min=1), 0.0)

        def macro(values: torch.Tensor) -> float:
            return values[present].mean().item() if present.any() else 0.0

        return {
            "map_macro": macro(average_precision(scores, targets)),
            "map_micro": average_precision(scores.reshape(-1, 1), targets.reshape(-1, 1)).nan_to_num(0.0).item(),
            "f1_macro": macro(ratio(2 * tp, 2 * tp + fp + fn)),
            "f1_micro": ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()).item(),
            "precision_macro": macro(ratio(tp, tp + fp)),
            "precision_micro": ratio(tp.sum(), tp.sum() + fp.sum()).item(),
            "recall_macro": macro(ratio(tp, tp + fn)),
            "recall_micro": ratio(tp.sum(), tp.sum() + fn.sum()).item(),
            "labels_without_positives": int((~present).sum()),
        }
