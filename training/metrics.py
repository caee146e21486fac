"""Validation metrics: single-label top-k accuracy and the multi-label precision / recall / F1 / mAP family."""

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from timm.utils import accuracy

import utils
from data.scan import available_memory
from utils import UserError

__all__ = ["LABEL_SCORE_BYTES", "Metric", "MultiLabelMetrics", "TopKAccuracy", "average_precision",
           "require_memory"]

LABEL_SCORE_BYTES = 5  # what multi-label validation keeps per (image, label): a float32 confidence, a bool presence
SORTED_AT_ONCE = 1 << 24  # confidences sorted in one piece by the average precision (64 MiB of float32)


def require_memory(need: int, what: str, advice: str) -> None:
    """Stop with a one-line :class:`UserError` before allocating ``need`` bytes for ``what`` when the system has
    less memory available (unknown availability: no check)."""
    available = available_memory()
    if available is not None and need > available:
        raise UserError(f"{what} needs {need / 2**30:.2f} GiB of memory, {available / 2**30:.2f} GiB are available; "
                        f"{advice}")


class Metric(Protocol):
    """Validation metric accumulated over batches: ``update`` per batch, ``compute`` once at the end."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None: ...

    def compute(self, distributed: bool = False) -> dict[str, float]:
        """Final values; with ``distributed`` the batches of every process are combined."""
        ...


class TopKAccuracy:
    """Single-label top-k accuracy in percent (``acc1``, ``acc5``; k is capped at the number of classes) and the
    macro recall (``macro_recall``: the top-1 recall of each class with validation images, averaged)."""

    def __init__(self, topk: Sequence[int] = (1, 5)):
        self.topk = tuple(topk)
        self.correct = torch.zeros(len(self.topk), dtype=torch.float64)
        self.count = 0
        self.per_class = torch.zeros((2, 0), dtype=torch.float64)  # (images, top-1 hits) per class

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        batch = target.shape[0]  # timm's accuracy: percent of the batch per k (k capped at the class count)
        counts = torch.stack([percent.double() * batch / 100 for percent in accuracy(output, target, self.topk)])
        self.correct = self.correct.to(output.device) + counts.round()
        self.count += batch
        classes = output.shape[1]
        hits = target[output.argmax(dim=1) == target]
        seen = torch.stack([torch.bincount(t, minlength=classes).double() for t in (target, hits)])
        self.per_class = seen + (self.per_class.to(seen.device) if self.per_class.numel() else 0)

    def compute(self, distributed: bool = False) -> dict[str, float]:
        totals = torch.cat([self.correct, self.correct.new_tensor([self.count]), self.per_class.flatten()])
        if distributed:
            utils.all_reduce_sum(totals)
        n = len(self.topk)
        correct, count = totals[:n].tolist(), max(totals[n].item(), 1)
        images, hits = totals[n + 1:].reshape(2, -1)
        recall = (hits[images > 0] / images[images > 0]).mean().item() if (images > 0).any() else 0.0
        return {**{f"acc{k}": 100.0 * c / count for k, c in zip(self.topk, correct, strict=True)},
                "macro_recall": 100.0 * recall}


def _ap(ranked: Iterable[np.ndarray], positives: np.ndarray) -> float:
    """Average precision from the confidences of the positives and every confidence sorted ascending (in one or
    more sorted pieces): the precision at each positive's own threshold (every confidence at or above it counts),
    averaged over the positives. NaN without a positive."""
    if not positives.size:
        return float("nan")
    positives = np.sort(positives)
    at_or_above = sum(piece.size - np.searchsorted(piece, positives) for piece in ranked)
    positives_at_or_above = positives.size - np.searchsorted(positives, positives)
    return float(np.mean(positives_at_or_above / at_or_above))


def _label_ap(scores: Sequence[np.ndarray], present: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`average_precision` of row batches (same columns), a block of label columns sorted at a time."""
    images, labels = sum(len(batch) for batch in scores), scores[0].shape[1]
    step = max(1, SORTED_AT_ONCE // max(images, 1))
    ap = np.full(labels, np.nan)
    for start in range(0, labels, step):
        columns = slice(start, start + step)
        block = np.concatenate([batch[:, columns] for batch in scores]).T.copy()
        hits = np.concatenate([batch[:, columns] for batch in present]).T.copy()
        for i, (row, ranked, row_hits) in enumerate(zip(block, np.sort(block, axis=1), hits, strict=True)):
            ap[start + i] = _ap([ranked], row[row_hits])
    return ap


def _sorted_pieces(batches: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """Every value of ``batches``, flattened and sorted in pieces of about :data:`SORTED_AT_ONCE` values."""
    piece: list[np.ndarray] = []
    size = 0
    for batch in batches:
        piece.append(batch.ravel())
        size += batch.size
        if size >= SORTED_AT_ONCE:
            yield np.sort(np.concatenate(piece))
            piece, size = [], 0
    if piece:
        yield np.sort(np.concatenate(piece))


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each column of ``scores`` (N, C) against the boolean ``targets`` (N, C).

    scikit-learn's definition: the sum over decreasing score thresholds of (recall increase) x precision, with tied
    scores forming one threshold. NaN for a column without a positive. One sort per column, a block at a time.
    """
    return torch.from_numpy(_label_ap([scores.cpu().numpy()], [targets.cpu().numpy()]))


class MultiLabelMetrics:
    """Multi-label metrics on label presence (target > 0), from sigmoid scores; fractions in [0, 1].

    ``map_micro``/``map_macro``: average precision over all (image, label) pairs / mean per-label AP, where labels
    without a positive in the evaluated split are left out of every macro value (``labels_without_positives``
    counts them). ``precision``/``recall``/``f1`` ``_micro``/``_macro`` at ``threshold``: micro sums the counts
    over all labels; macro averages the per-label values (precision 0 for a label never predicted). The confidences
    are kept for the average precision (:data:`LABEL_SCORE_BYTES` per image and label, see :meth:`check_memory`);
    the threshold counts are summed as the batches arrive.
    """

    def __init__(self, threshold: float = 0.4):
        self.threshold = threshold
        self.scores: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.counts: np.ndarray | None = None  # (3, labels): true positives, false positives, false negatives

    @staticmethod
    def check_memory(images: int, labels: int) -> None:
        """Stop before training when validation could not hold the confidences of ``images`` x ``labels``."""
        require_memory(images * labels * LABEL_SCORE_BYTES,
                       f"multi-label validation of {images:,} images x {labels:,} labels ({LABEL_SCORE_BYTES} bytes "
                       "each)", "validate on fewer images (a shorter --val-ann CSV) or train on fewer labels")

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        scores = output.detach().float().sigmoid().cpu().numpy()
        present = (target > 0).cpu().numpy()
        predicted = scores >= self.threshold
        counts = np.stack([(predicted & present).sum(0), (predicted & ~present).sum(0),
                           (~predicted & present).sum(0)])
        self.counts = counts if self.counts is None else self.counts + counts
        self.scores.append(scores)
        self.targets.append(present)

    def compute(self, distributed: bool = False) -> dict[str, float]:
        """The values over this process's batches, or (``distributed``) over every process's, computed once by the
        main process and sent to the others."""
        part = (self.scores, self.targets, self.counts)
        return _once_on_main(_label_metrics, part) if distributed else _label_metrics([part])


def _once_on_main(compute: Callable[[list[Any]], Any], part: Any) -> Any:
    """``compute(parts)`` over the ``part`` of every process, run by the main process only; every process gets
    its result."""
    if not utils.is_dist_avail_and_initialized():
        return compute([part])
    parts = [None] * utils.get_world_size() if utils.is_main_process() else None
    torch.distributed.gather_object(part, parts, dst=0)
    result = [compute(parts) if utils.is_main_process() else None]
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def _label_metrics(parts: list[tuple]) -> dict[str, float]:
    """The values of :class:`MultiLabelMetrics` from ``(score batches, presence batches, threshold counts)`` of
    one or more processes."""
    scores = [batch for process_scores, _, _ in parts for batch in process_scores]
    targets = [batch for _, process_targets, _ in parts for batch in process_targets]
    tp, fp, fn = sum(counts for _, _, counts in parts if counts is not None).astype(np.float64)
    present = tp + fn > 0

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.where(den > 0, num / np.maximum(den, 1), 0.0)

    def macro(values: np.ndarray) -> float:
        return float(values[present].mean()) if present.any() else 0.0

    micro = _ap(_sorted_pieces(scores), np.concatenate([s[t] for s, t in zip(scores, targets, strict=True)]))
    return {
        "map_macro": macro(_label_ap(scores, targets)),
        "map_micro": float(np.nan_to_num(micro, nan=0.0)),
        "f1_macro": macro(ratio(2 * tp, 2 * tp + fp + fn)),
        "f1_micro": float(ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
        "precision_macro": macro(ratio(tp, tp + fp)),
        "precision_micro": float(ratio(tp.sum(), tp.sum() + fp.sum())),
        "recall_macro": macro(ratio(tp, tp + fn)),
        "recall_micro": float(ratio(tp.sum(), tp.sum() + fn.sum())),
        "labels_without_positives": int((~present).sum()),
    }
