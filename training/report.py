"""The training report written at the end of every run: ``report.html`` and its PNGs (matplotlib, Agg) in the run
folder.

Loss and metric curves and the learning-rate schedule from ``train_log.txt``; from a validation pass of
``model_best.pth``: a confusion matrix (up to :data:`MAX_MATRIX_CLASSES` classes, else the most confused pairs
listed), per-class accuracy sorted, recall against the number of training images per artist (the long tail at a
glance, also written as ``report_per_class.csv`` and summed up in the console), and the worst-classified validation
images as thumbnails. Multi-label runs
get the curves and the per-label average precision.

Single-label validation is kept as a few numbers per image (:class:`Predictions`) and counted sparsely, so the
report's memory grows with images + classes, never with classes squared; the multi-label confidences (images x
labels) are checked against the available memory before they are allocated.
"""

import copy
import csv
import html
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from artifacts.checkpoint import BEST_FILE, load_checkpoint
from data.images import ImageLoadError, load_image
from training.metrics import LABEL_SCORE_BYTES, average_precision, require_memory
from utils import UserError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # noqa: E402

__all__ = ["MAX_MATRIX_CLASSES", "PER_CLASS_FILE", "REPORT_FILE", "LabelScores", "Predictions", "best_summary",
           "most_confused", "per_class_accuracy", "predict", "tail_summary", "write_per_class", "write_report",
           "write_run_report"]

REPORT_FILE = "report.html"
PER_CLASS_FILE = "report_per_class.csv"  # artist, train_images, val_images, recall (empty: no validation image)
TAIL_SHOWN = 3  # artists named in the console's tail line
MAX_MATRIX_CLASSES = 50
WORST_SHOWN = 16
PAIRS_SHOWN = 20


@dataclass
class Predictions:
    """What the report keeps of single-label validation outputs, per image in dataset order (memory linear in the
    images, whatever the class count): the true class id, the top-1 class id, their probabilities, the paths."""

    targets: np.ndarray
    predicted: np.ndarray
    predicted_score: np.ndarray
    true_score: np.ndarray
    paths: list[str] = field(default_factory=list)

    @classmethod
    def from_scores(cls, scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                    paths: Sequence[str] = ()) -> "Predictions":
        """From class probabilities ``scores`` (N, C) and class ids ``targets`` (N,); ties go to the lowest id."""
        scores, targets = torch.as_tensor(scores), torch.as_tensor(targets).long()
        top, predicted = scores.max(dim=1)
        true = scores.gather(1, targets.unsqueeze(1)).squeeze(1)
        return cls(*(t.cpu().numpy() for t in (targets, predicted, top.float(), true.float())), list(paths))

    @classmethod
    def concat(cls, parts: Sequence["Predictions"], paths: Sequence[str]) -> "Predictions":
        """The batches ``parts`` as one, with the image ``paths``."""
        per_image = [f.name for f in fields(cls) if f.name != "paths"]
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) for name in per_image), list(paths))


@dataclass
class LabelScores:
    """Multi-label validation outputs: sigmoid ``scores`` (N, C) float32 and label ``present`` (N, C) bool."""

    scores: np.ndarray
    present: np.ndarray


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
            multi_label: bool = False) -> Predictions | LabelScores | None:
    """The outputs of ``model`` on every image of ``dataset``, in order: :class:`Predictions` from the softmax, or
    (``multi_label``) :class:`LabelScores` from the sigmoid, whose size is checked before it is allocated."""
    model.eval()
    batches = ((model(images.to(device)).float(), target)
               for images, target in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0))
    if multi_label:
        return _label_scores(batches, len(dataset))
    parts = [Predictions.from_scores(output.softmax(dim=1), target.to(device)) for output, target in batches]
    return Predictions.concat(parts, [str(sample[0]) for sample in getattr(dataset, "samples", [])])


def _label_scores(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], images: int) -> LabelScores | None:
    """The sigmoid outputs of ``images`` images, stored as the batches arrive (no concatenated copy)."""
    labels, start = None, 0
    for output, target in batches:
        if labels is None:
            need = images * output.shape[1] * LABEL_SCORE_BYTES
            require_memory(need, f"the report's average precision of {images:,} images x {output.shape[1]:,} labels",
                           "validate on fewer images (a shorter --val-ann CSV)")
            labels = LabelScores(np.empty((images, output.shape[1]), np.float32),
                                 np.empty((images, output.shape[1]), bool))
        labels.scores[start:start + len(output)] = output.sigmoid().cpu().numpy()
        labels.present[start:start + len(output)] = (target > 0).numpy()
        start += len(output)
    return labels


def best_summary(records: Sequence[dict[str, Any]], best_epoch: int | None, best_key: str,
                 source: str | None) -> str:
    """``best: epoch E (model weights): val acc1 .., loss ..`` from the log record of the best epoch."""
    record = next((r for r in records if r.get("epoch") == best_epoch), None)
    if record is None:
        return "best: no validation result"
    prefix = "ema_val_" if source == "model_ema" else "val_"
    values = ", ".join(f"{key[len(prefix):]} {value:.4g}" for key, value in record.items()
                       if key.startswith(prefix) and isinstance(value, (int, float)))
    return f"best {best_key}: epoch {best_epoch} ({source} weights): {values}"


def _figure(path: Path, draw, size: tuple[float, float] = (6.4, 4.0)) -> str:
    """Draw with ``draw(figure, axes)``, save as PNG, return the file name."""
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(fig, ax)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path.name


def _save(fig, path: Path) -> None:
    """Save a figure as PNG; names in scripts the font lacks (CJK artist names) are drawn as boxes, silently."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.tight_layout()
        fig.savefig(path, dpi=90)


def _curve(ax, records: Sequence[dict[str, Any]], keys: Sequence[str], title: str) -> None:
    for key in keys:
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _curve_pngs(folder: Path, records: Sequence[dict[str, Any]], best_key: str,
                metric_keys: Sequence[str] | None = None) -> list[str]:
    metric = metric_keys or [f"val_{best_key}", f"ema_val_{best_key}"] + (["val_acc5"] if best_key == "acc1" else [])
    title = best_key if metric_keys else f"validation {best_key}"
    return [
        _figure(folder / "report_loss.png", lambda f, ax: _curve(ax, records, ["train_loss", "val_loss",
                                                                               "ema_val_loss"], "loss")),
        _figure(folder / "report_metric.png", lambda f, ax: _curve(ax, records, metric, title)),
        _figure(folder / "report_lr.png", lambda f, ax: _curve(ax, records, ["lr"], "learning rate (end of epoch)")),
    ]


def _per_class_png(folder: Path, names: Sequence[str], values: np.ndarray, title: str) -> str:
    order = np.argsort(values)
    shown = order if len(order) <= MAX_MATRIX_CLASSES else order[:MAX_MATRIX_CLASSES]
    height = 1.0 + 0.22 * len(shown)

    def draw(fig, ax):
        ax.barh(range(len(shown)), values[shown], color="tab:blue")
        ax.set_yticks(range(len(shown)), [names[i] for i in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(title if len(shown) == len(order) else f"{title} (the {len(shown)} lowest)")

    return _figure(folder / "report_per_class.png", draw, (6.4, height))


def per_class_accuracy(preds: Predictions, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class on its validation images; NaN for a class without one."""
    counts = np.bincount(preds.targets, minlength=num_classes)
    correct = np.bincount(preds.targets[preds.predicted == preds.targets], minlength=num_classes)
    return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)


def most_confused(preds: Predictions, num_classes: int, limit: int = PAIRS_SHOWN) -> list[tuple[int, int, int]]:
    """The ``limit`` most frequent ``(true id, predicted id, images)`` with true != predicted: images descending,
    ties by true id then predicted id. Counted over the misclassified images' pair codes, memory linear in them."""
    wrong = preds.targets != preds.predicted
    codes = preds.targets[wrong].astype(np.int64) * num_classes + preds.predicted[wrong]  # < 2**63 up to 3e9 classes
    codes, counts = np.unique(codes, return_counts=True)  # in (true, predicted) order
    top = np.argsort(-counts, kind="stable")[:limit]
    return [(int(code // num_classes), int(code % num_classes), int(count))
            for code, count in zip(codes[top], counts[top], strict=True)]


def _confusion_png(folder: Path, preds: Predictions, names: Sequence[str]) -> str:
    """The confusion matrix (only drawn up to :data:`MAX_MATRIX_CLASSES` classes)."""
    matrix = confusion_matrix(preds.targets, preds.predicted, labels=list(range(len(names))))
    side = 3 + 0.3 * len(names)

    def draw(fig, ax):
        ConfusionMatrixDisplay(matrix, display_labels=list(names)).plot(ax=ax, colorbar=False,
                                                                       xticks_rotation="vertical")
        ax.set_title("confusion matrix (validation, best weights)")

    return _figure(folder / "report_confusion.png", draw, (side, side))


def _worst_png(folder: Path, preds: Predictions, names: Sequence[str]) -> str | None:
    """Thumbnails of the validation images whose true class got the lowest probability."""
    if not preds.paths:
        return None
    lowest = np.argsort(preds.true_score, kind="stable")[:WORST_SHOWN]
    worst = [i for i in lowest if preds.predicted[i] != preds.targets[i]]
    if not worst:
        return None
    cols = min(4, len(worst))
    rows = (len(worst) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, worst, strict=False):
            try:
                image = load_image(preds.paths[i])
                image.thumbnail((160, 160))
                ax.imshow(image)
            except ImageLoadError:
                pass
            ax.set_title(f"{names[preds.targets[i]]}\n-> {names[preds.predicted[i]]} ({preds.predicted_score[i]:.2f})",
                         fontsize=8)
        _save(fig, folder / "report_worst.png")
    finally:
        plt.close(fig)
    return "report_worst.png"


def tail_summary(preds: Predictions, names: Sequence[str], train_counts: Sequence[int] | None) -> str:
    """One line: top-1 beside macro recall, and the artists with the fewest training images and their recall."""
    recall = per_class_accuracy(preds, len(names))
    line = (f"validation of the best weights: top-1 {np.mean(preds.predicted == preds.targets):.3f}, "
            f"macro recall {np.nanmean(recall) if np.isfinite(recall).any() else 0:.3f}")
    if train_counts is None:
        return line
    fewest = [i for i in np.argsort(train_counts, kind="stable") if np.isfinite(recall[i])][:TAIL_SHOWN]
    tail = ", ".join(f"{names[i]} {recall[i]:.2f} ({train_counts[i]} training images)" for i in fewest)
    return f"{line}; fewest training images: {tail}; lowest recall {np.nanmin(recall):.2f}"


def write_per_class(path: Path, preds: Predictions, names: Sequence[str], train_counts: Sequence[int]) -> None:
    """``report_per_class.csv``: each artist's training and validation images and validation recall."""
    recall = per_class_accuracy(preds, len(names))
    val_counts = np.bincount(preds.targets, minlength=len(names))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("artist", "train_images", "val_images", "recall"))
        writer.writerows((name, int(train_counts[i]), int(val_counts[i]), "" if np.isnan(recall[i]) else
                          f"{recall[i]:.4f}") for i, name in enumerate(names))


def _tail_section(folder: Path, preds: Predictions, names: Sequence[str], train_counts: Sequence[int]) -> str:
    """Recall against training images per artist (scatter) and the per-artist CSV."""
    recall = per_class_accuracy(preds, len(names))
    seen = np.isfinite(recall)
    counts = np.asarray(train_counts)

    def draw(fig, ax):
        ax.scatter(counts[seen], recall[seen], alpha=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("training images of the artist")
        ax.set_ylabel("validation recall")
        ax.set_title("recall by training images per artist")
        ax.grid(alpha=0.3)

    write_per_class(folder / PER_CLASS_FILE, preds, names, train_counts)
    return (f"<h2>The long tail</h2>{_img(_figure(folder / 'report_tail.png', draw))}"
            f'<p>Per artist: <a href="{PER_CLASS_FILE}">{PER_CLASS_FILE}</a></p>')


def _single_label_section(folder: Path, preds: Predictions, names: Sequence[str],
                          train_counts: Sequence[int] | None = None) -> str:
    shown = np.nan_to_num(per_class_accuracy(preds, len(names)), nan=1.0)
    parts = [f"<p>{html.escape(tail_summary(preds, names, train_counts))}</p>",
             _img(_per_class_png(folder, names, shown, "accuracy per class (validation)"))]
    if train_counts is not None:
        parts.append(_tail_section(folder, preds, names, train_counts))
    if len(names) <= MAX_MATRIX_CLASSES:
        parts.append(_img(_confusion_png(folder, preds, names)))
    pairs = most_confused(preds, len(names))
    rows = "".join(f"<tr><td>{html.escape(names[a])}</td><td>{html.escape(names[b])}</td><td>{n}</td></tr>"
                   for a, b, n in pairs)
    parts.append("<h2>Most confused pairs</h2><table><tr><th>true</th><th>predicted as</th><th>images</th></tr>"
                 f"{rows}</table>" if pairs else "<p>No validation image was confused.</p>")
    worst = _worst_png(folder, preds, names)
    if worst:
        parts.append(f"<h2>Worst-classified validation images</h2>{_img(worst)}")
    return "".join(parts)


def _multi_label_section(folder: Path, preds: LabelScores, names: Sequence[str], train_counts: None = None) -> str:
    ap = average_precision(torch.from_numpy(preds.scores), torch.from_numpy(preds.present)).numpy()
    return _img(_per_class_png(folder, names, np.nan_to_num(ap, nan=0.0), "average precision per label"))


def _img(name: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(name)}"></p>'


def write_report(folder: str | os.PathLike, records: Sequence[dict[str, Any]], class_names: Sequence[str],
                 preds: Predictions | LabelScores | None, best_key: str, summary: str,
                 train_counts: Sequence[int] | None = None, metric_keys: Sequence[str] | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``folder``; ``preds``: the best weights' validation outputs;
    ``train_counts``: training images per class (single-label: adds the long-tail view); ``metric_keys``: the
    record keys of the metric curve (default: the validation ``best_key`` of the weights and the EMA)."""
    folder = Path(folder)
    body = [f"<h1>Training report</h1><p>{html.escape(summary)}</p><h2>Curves</h2>"]
    body += [_img(name) for name in _curve_pngs(folder, records, best_key, metric_keys)]
    if preds is not None:
        body.append("<h2>Validation of the best weights</h2>")
        section = _multi_label_section if isinstance(preds, LabelScores) else _single_label_section
        body.append(section(folder, preds, class_names, train_counts))
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Training report</title><style>body{font-family:"
            "sans-serif;max-width:60em;margin:1em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 8px}</style></head><body>" + "".join(body) + "</body></html>\n")
    path = folder / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


def write_run_report(folder: Path, model: nn.Module, records: Sequence[dict[str, Any]], class_names: Sequence[str],
                     val_dataset: Dataset, device: torch.device, *, best_key: str, summary: str, batch_size: int,
                     multi_label: bool = False, train_counts: Sequence[int] | None = None) -> Path | None:
    """The end-of-run report: the best weights (``model_best.pth``) predict ``val_dataset``, then
    :func:`write_report` (single-label: :func:`tail_summary` is printed). A failure is a warning: the run's
    checkpoints are already saved."""
    try:
        preds = None
        if (folder / BEST_FILE).is_file():
            best = copy.deepcopy(model)
            load_checkpoint(folder / BEST_FILE, best, log=lambda _: None)
            preds = predict(best, val_dataset, device, batch_size, multi_label)
        path = write_report(folder, records, class_names, preds, best_key, summary, train_counts)
        if isinstance(preds, Predictions):
            print(tail_summary(preds, class_names, train_counts), flush=True)
    except (OSError, ValueError, RuntimeError, MemoryError, UserError) as err:
        print(f"warning: the training report could not be written ({err}); the run itself is saved", flush=True)
        return None
    print(f"training report: {path}", flush=True)
    return path
