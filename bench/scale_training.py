"""Scale steps of training with many classes (issue 23, part 3) for ``bench_scale.py``: the end-of-run report and
the multi-label validation metrics, fed generated predictions (no model is trained, so the steps time the report and
metric code alone).

    python bench/bench_scale.py --steps report,multilabel_metrics --quick

``report``: a 100,000-class report of 200,000 validation images (``--quick``: 10,000 x 20,000), each class with a
few look-alike classes it is confused with; plus the most-confused pairs counted as before the change (a dense
classes x classes matrix) and sparsely, at a size the dense count fits. ``multilabel_metrics``: ``compute()`` of
20,000 images x 5,000 long-tailed labels (``--quick``: 4,000 x 1,000), and the computation before the change
(:func:`_ap_before`, the torch implementation it replaced) against the current one at a smaller size.
"""

import tempfile
import time

import numpy as np
import torch
from scale_common import measure, rss_gib
from sklearn.metrics import confusion_matrix

from training.metrics import MultiLabelMetrics
from training.report import Predictions, most_confused, write_report

RECORDS = [{"epoch": e, "lr": 1e-3 / e, "train_loss": 3 / e, "val_loss": 3.2 / e, "val_acc1": 20.0 * e,
            "val_acc5": 30.0 * e} for e in (1, 2, 3)]
BATCH = 256  # validation batch of the multi-label step


def confused_predictions(images: int, classes: int, seed: int = 0) -> Predictions:
    """Top-1 predictions: 70% right, 20% one of the true class's 3 look-alikes, 10% anywhere; paths that do not
    exist (their thumbnails stay empty, as for moved images)."""
    rng = np.random.default_rng(seed)
    look_alikes = rng.integers(0, classes, (classes, 3))
    targets = rng.integers(0, classes, images)
    draw = rng.random(images)
    predicted = np.where(draw < 0.7, targets, look_alikes[targets, rng.integers(0, 3, images)])
    predicted = np.where(draw > 0.9, rng.integers(0, classes, images), predicted)
    top = rng.uniform(0.2, 1.0, images).astype(np.float32)
    true = np.where(predicted == targets, top, top * rng.random(images, dtype=np.float32))
    return Predictions(targets, predicted, top, true, [f"missing/{i}.jpg" for i in range(images)])


def _dense_pairs_before(preds: Predictions, classes: int) -> list[tuple[int, int]]:
    """The most confused pairs as the report counted them before: a dense int64 matrix, a copy, a full argsort."""
    matrix = confusion_matrix(preds.targets, preds.predicted, labels=list(range(classes)))
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    return list(zip(*np.unravel_index(np.argsort(off, axis=None)[::-1][:20], off.shape), strict=True))


def report(quick: bool) -> list[dict]:
    classes, images = (10_000, 20_000) if quick else (100_000, 200_000)
    preds = confused_predictions(images, classes)
    names = [f"artist_{i:06d}" for i in range(classes)]
    start_gib = rss_gib("VmRSS")
    with tempfile.TemporaryDirectory() as folder, measure() as step:
        write_report(folder, RECORDS, names, preds, "acc1", "best acc1: epoch 3")
    rows = [{"path": "training report (report.html)", "size": f"{classes:,} classes, {images:,} val images",
             "seconds": step.seconds, "peak_gib": step.peak_gib,
             "before": None if quick else "MemoryError (74.5 GiB dense matrix)", "target": "2 GB",
             "note": f"sparse pair counts; the process held {start_gib:.2f} GiB before (torch, matplotlib)"}]
    small = 2_000 if quick else 5_000  # the dense count needs 3 x small**2 x 8 bytes
    preds = confused_predictions(4 * small, small, seed=1)
    for label, count in (("dense matrix (before)", _dense_pairs_before), ("sparse counts", most_confused)):
        with measure() as step:
            count(preds, small)
        rows.append({"path": f"report: most confused pairs, {label}", "size": f"{small:,} classes, {4 * small:,} "
                     "val images", "seconds": step.seconds, "peak_gib": step.peak_gib})
    return rows


def label_batches(images: int, labels: int, seed: int = 0):
    """Validation batches ``(logits, targets)``: 1-4 labels per image drawn from a long-tailed (Zipf) label
    frequency, logits 3 higher on the present labels."""
    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, labels + 1)
    frequency /= frequency.sum()
    for start in range(0, images, BATCH):
        rows = min(BATCH, images - start)
        drawn = rng.choice(labels, (rows, 4), p=frequency)
        keep = np.arange(4) < rng.integers(1, 5, (rows, 1))
        targets = np.zeros((rows, labels), np.float32)
        targets[np.nonzero(keep)[0], drawn[keep]] = 1.0
        logits = rng.standard_normal((rows, labels), dtype=np.float32) + 3 * targets
        yield torch.from_numpy(logits), torch.from_numpy(targets)


def _ap_before(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-column average precision as computed before the change (every column sorted at once, float64 copies)."""
    n = scores.shape[0]
    order = scores.argsort(dim=0, descending=True, stable=True)
    sorted_scores = scores.gather(0, order)
    hits = targets.gather(0, order).double()
    precision = hits.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    positions = torch.arange(n).unsqueeze(1).expand_as(sorted_scores)
    run_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    run_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end_index = torch.where(run_end, positions, n).flip(0).cummin(dim=0).values.flip(0)
    return (hits * precision.gather(0, end_index)).sum(0) / hits.sum(0)


def _metrics_now(images: int, labels: int) -> tuple[dict, float, float]:
    """``update`` per batch and ``compute``: their seconds (the batches' generation left out) and the peak."""
    metric, seconds = MultiLabelMetrics(), 0.0
    with measure() as step:
        for logits, targets in label_batches(images, labels):
            start = time.perf_counter()
            metric.update(logits, targets)
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        values = metric.compute()
        seconds += time.perf_counter() - start
    return values, seconds, step.peak_gib


def _metrics_before(images: int, labels: int) -> tuple[float, float, float, float]:
    """Macro and micro AP as ``compute()`` did before: the batches concatenated, then :func:`_ap_before`; the
    seconds of the AP alone."""
    with measure() as step:
        batches = [(logits.sigmoid(), targets > 0) for logits, targets in label_batches(images, labels)]
        scores, present = torch.cat([s for s, _ in batches]), torch.cat([t for _, t in batches])
        start = time.perf_counter()
        macro = _ap_before(scores, present)[present.any(dim=0)].mean().item()
        micro = _ap_before(scores.reshape(-1, 1), present.reshape(-1, 1)).item()
        seconds = time.perf_counter() - start
    return macro, micro, seconds, step.peak_gib


def multilabel_metrics(quick: bool) -> list[dict]:
    images, labels = (4_000, 1_000) if quick else (20_000, 5_000)
    start_gib = rss_gib("VmRSS")
    _, seconds, peak = _metrics_now(images, labels)
    rows = [{"path": "multi-label metrics compute()", "size": f"{images:,} images x {labels:,} labels",
             "seconds": seconds, "peak_gib": peak, "before": None if quick else "142 s, 7.8 GB",
             "note": f"update + compute of one validation pass; the process held {start_gib:.2f} GiB before"}]
    images, labels = (2_000, 500) if quick else (5_000, 1_000)
    now, seconds, peak = _metrics_now(images, labels)
    macro, micro, before_seconds, before_peak = _metrics_before(images, labels)
    agree = abs(macro - now["map_macro"]) < 1e-9 and abs(micro - now["map_micro"]) < 1e-9
    rows.append({"path": "multi-label metrics compute(), before vs now", "size": f"{images:,} images x {labels:,} "
                 "labels", "seconds": seconds, "peak_gib": peak,
                 "before": f"{before_seconds:.3g} s, {before_peak:.2f} GiB",
                 "note": "same map_macro / map_micro" if agree else "VALUES DIFFER"})
    return rows


STEPS = {"report": report, "multilabel_metrics": multilabel_metrics}
