"""Multi-label annotations: the ``image_path,labels`` CSV syntax, its dataset, and the helpers of the CSV tools.

Syntax: a header ``image_path,labels``; ``image_path`` relative to the data path or absolute; labels separated by
a delimiter (default ``,``, so quote the field: ``a.jpg,"cat,dog"``). ``(label:weight)`` gives a label a weight:
the number after the LAST colon, so ``(re:zero:1.4)`` is ``re:zero`` with weight 1.4; ``re:zero`` alone has
weight 1. A label repeated in a row has its weights added.
"""

import csv
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from utils import UserError

from .images import is_image_file, load_first_readable
from .prepare import val_count
from .scan import ScanCache, verify_images, walk_files

__all__ = [
    "CSV_HEADER",
    "MultiLabelImageDataset",
    "annotation_counts",
    "collect_labeled_images",
    "format_labels",
    "parse_labels",
    "read_label_file",
    "read_multilabel_csv",
    "report_unusable_images",
    "split_multilabel_rows",
    "write_multilabel_csv",
]

CSV_HEADER = ["image_path", "labels"]
Row = tuple[str, dict[str, float]]
PREVIEW = 10  # how many skipped images the tools list


def parse_labels(text: str, delimiter: str = ",") -> dict[str, float]:
    """``"a, (b:0.5), a"`` -> ``{"a": 2.0, "b": 0.5}``; empty items are ignored.

    Raises:
        ValueError: no label at all, or a ``(label:weight)`` whose weight is not a positive number.
    """
    labels: dict[str, float] = {}
    for item in text.split(delimiter):
        item = item.strip()
        if not item:
            continue
        name, weight = _parse_label(item)
        labels[name] = labels.get(name, 0.0) + weight
    if not labels:
        raise ValueError("empty labels: give at least one label")
    return labels


def _parse_label(item: str) -> tuple[str, float]:
    if not (item.startswith("(") and item.endswith(")") and ":" in item):
        return item, 1.0
    name, _, raw_weight = item[1:-1].rpartition(":")
    name = name.strip()
    try:
        weight = float(raw_weight)
    except ValueError:
        raise ValueError(f"the weight in {item!r} is not a number; write (label:weight), e.g. (label:0.5)") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"the weight in {item!r} must be a positive number")
    if not name:
        raise ValueError(f"{item!r} has no label name before the weight")
    return name, weight


def format_labels(labels: Mapping[str, float], delimiter: str = ",") -> str:
    """The inverse of :func:`parse_labels`: weight-1 labels plain, others as ``(label:weight)``."""
    items = []
    for name, weight in labels.items():
        if delimiter in name:
            raise ValueError(f"label {name!r} contains the label delimiter {delimiter!r}; choose another delimiter")
        plain = weight == 1 and not (name.startswith("(") and name.endswith(")"))
        items.append(name if plain else f"({name}:{int(weight) if float(weight).is_integer() else weight})")
    return delimiter.join(items)


def read_multilabel_csv(path: str | os.PathLike, label_delimiter: str = ",") -> list[Row]:
    """Rows ``(image_path, {label: weight})`` of an annotation CSV; blank lines are skipped.

    Raises:
        UserError: missing file or header, or a malformed row; the message names the file and line.
    """
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [cell.strip() for cell in header] != CSV_HEADER:
                raise UserError(f"{path}, line 1: expected the header 'image_path,labels'; add it as the first line")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                rows.append(_parse_row(row, label_delimiter, f"{path}, line {reader.line_num}"))
    except FileNotFoundError:
        raise UserError(f"annotation file {path} not found; check the path") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason}); save it as UTF-8") from None
    return rows


def annotation_counts(path: str | os.PathLike, label_delimiter: str = ",") -> tuple[int, list[int]]:
    """Rows and positives per label (sorted labels) of an annotation CSV: the data's shape before the images are
    verified (the training recipe's view)."""
    rows = read_multilabel_csv(path, label_delimiter)
    counts = Counter(name for _, labels in rows for name in labels)
    return len(rows), [counts[name] for name in sorted(counts)]


def _parse_row(row: list[str], label_delimiter: str, where: str) -> Row:
    image_path = row[0].strip()
    if not image_path:
        raise UserError(f"{where}: missing image_path; every row needs an image path and labels")
    if len(row) > 2 and label_delimiter != ",":
        raise UserError(f"{where}: expected 2 fields (image_path,labels), got {len(row)}; quote the labels field")
    # With the default delimiter, unquoted labels (a.jpg,cat,dog) arrive as extra fields: they are labels too.
    text = ",".join(row[1:])
    try:
        return image_path, parse_labels(text, label_delimiter)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


def write_multilabel_csv(path: str | os.PathLike, rows: Iterable[Row], label_delimiter: str = ",") -> None:
    """Write rows in the syntax :func:`read_multilabel_csv` reads (the file is replaced only once complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for image_path, labels in rows:
            writer.writerow([image_path, format_labels(labels, label_delimiter)])
    os.replace(tmp, path)


class MultiLabelImageDataset(Dataset):
    """``(image, target)`` pairs from an annotation CSV; ``target[c]`` is label c's weight / the row's largest.

    Args:
        annotations: the ``image_path,labels`` CSV.
        root: folder that relative image paths start from.
        classes: the label set in id order. Default: the sorted labels of this CSV's usable rows (do so for the
            training set, then pass ``train_set.classes`` to the validation set). Labels outside it are reported
            and ignored.
        transform: applied to the RGB ``PIL.Image``.
        label_delimiter: separator of the labels inside the ``labels`` field.
        verbose: print warnings about left-out rows and unknown labels.
        allow_outside_root: use images whose path (symlinks resolved) lies outside ``root``.
        workers: processes that verify the images; ``cache_dir``: where the scan cache goes when ``root`` is
            read-only (see :func:`~data.scan.verify_images`).

    Rows whose image lies outside ``root`` (unless allowed), does not exist or is not a readable image are
    reported once and left out (so they count in no statistic); images that fail to load during an epoch are
    reported once and replaced by the next sample.
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        label_delimiter: str = ",",
        verbose: bool = True,
        allow_outside_root: bool = False,
        workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ):
        rows = read_multilabel_csv(annotations, label_delimiter)
        if not rows:
            raise UserError(f"{annotations} has no rows; add 'image_path,labels' rows")
        rows = _usable_rows(rows, annotations, root, allow_outside_root, workers, cache_dir, verbose)
        self.classes = list(classes) if classes is not None else sorted({name for _, labels in rows for name in labels})
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.unknown_labels: Counter[str] = Counter()
        self.samples: list[tuple[str, tuple[int, ...], tuple[float, ...]]] = []
        no_known_label = 0
        for path, labels in rows:
            known = {self.class_to_idx[name]: weight for name, weight in labels.items() if name in self.class_to_idx}
            self.unknown_labels.update(name for name in labels if name not in self.class_to_idx)
            no_known_label += not known
            top = max(known.values(), default=1.0)
            self.samples.append((path, tuple(known), tuple(weight / top for weight in known.values())))
        self._warned: set[str] = set()
        if verbose and self.unknown_labels:
            shown = ", ".join(f"{name} ({n} rows)" for name, n in self.unknown_labels.most_common(10))
            print(f"warning: {annotations}: {len(self.unknown_labels)} labels are not in the training classes and are "
                  f"ignored: {shown}" + (f"; {no_known_label} rows have no known label" if no_known_label else ""))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        image, used = load_first_readable(index, len(self.samples), lambda i: self.samples[i][0], self._warned)
        _, indices, values = self.samples[used]
        target = torch.zeros(len(self.classes))
        target[list(indices)] = torch.tensor(values)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _inside(path: str, root: str) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _usable_rows(rows: list[Row], annotations: str | os.PathLike, root: str | os.PathLike, allow_outside_root: bool,
                 workers: int, cache_dir: str | os.PathLike | None, verbose: bool) -> list[Row]:
    """The rows (image path joined to ``root``) whose image is inside ``root`` (unless allowed), exists and
    decodes; the others are reported once per kind. No usable row at all is a :class:`UserError`."""
    outside, missing, candidates = [], [], []
    for image_path, labels in rows:
        path = os.path.join(root, image_path)
        if not allow_outside_root and not _inside(path, os.fspath(root)):
            outside.append(image_path)
        elif not os.path.isfile(path):
            missing.append(path)
        else:
            candidates.append((path, labels))
    reasons = verify_images([path for path, _ in candidates], workers=workers, verbose=False,
                            cache=ScanCache.for_dataset(root, cache_dir)) if candidates else []
    unreadable = [f"{path} ({reason})" for (path, _), reason in zip(candidates, reasons, strict=True) if reason]
    usable = [row for row, reason in zip(candidates, reasons, strict=True) if reason is None]
    problems = [(outside, "lie outside --data-path (pass --allow-outside-root to use them)"),
                (missing, "do not exist"), (unreadable, "are not readable images")]
    if not usable:
        first = next(items[0] for items, _ in problems if items)
        raise UserError(f"none of the {len(rows)} images listed in {annotations} is usable (first: {first}); relative "
                        f"image paths start from {root}: check --data-path")
    for items, what in problems:
        if verbose and items:
            print(f"warning: {annotations}: {len(items)} listed images {what} and are left out (also of the label "
                  "statistics), e.g. " + ", ".join(items[:3]))
    return usable


def read_label_file(path: str | os.PathLike) -> dict[str, float]:
    """Labels of a ``.txt`` beside an image: comma-separated (over one or more lines), weights allowed.

    Raises:
        ValueError: empty file, bad weight, or not UTF-8.
    """
    try:
        text = Path(path).read_text("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason})") from None
    return parse_labels(",".join(text.splitlines()))


def collect_labeled_images(
    input_dir: str | os.PathLike, recursive: bool = False, relative_paths: bool = False
) -> tuple[list[Row], list[str], list[tuple[str, str]]]:
    """Images of ``input_dir`` with a same-named ``.txt`` label file (``a.jpg`` + ``a.txt``).

    Returns ``(rows, unlabeled, invalid)``: rows sorted by path (relative to ``input_dir`` or absolute), the images
    without a ``.txt``, and ``(txt file, reason)`` for label files that could not be used.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"input dir {input_dir} does not exist or is not a folder; pass --input-dir <images folder>")
    rows, unlabeled, invalid = [], [], []
    for path in walk_files(input_dir, recursive):
        if not is_image_file(path.name):
            continue
        shown = path.relative_to(input_dir).as_posix() if relative_paths else str(path.absolute())
        label_file = path.with_suffix(".txt")
        if not label_file.is_file():
            unlabeled.append(shown)
            continue
        try:
            rows.append((shown, read_label_file(label_file)))
        except ValueError as err:
            invalid.append((str(label_file), str(err)))
    return rows, unlabeled, invalid


def report_unusable_images(unlabeled: list[str], invalid: list[tuple[str, str]]) -> None:
    """Print the images skipped for lack of a ``.txt`` and the label files that could not be used."""
    for title, items in ((f"Skipped {len(unlabeled)} images without a .txt label file:", unlabeled),
                         (f"Skipped {len(invalid)} images whose .txt label file is unusable:",
                          [f"{path}: {reason}" for path, reason in invalid])):
        if items:
            print(title)
            for item in items[:PREVIEW]:
                print(f"  {item}")
            if len(items) > PREVIEW:
                print(f"  ... and {len(items) - PREVIEW} more")


def split_multilabel_rows(
    rows: Sequence[Row], val_ratio: float, min_label_count: int = 1, seed: int = 0
) -> tuple[list[Row], list[Row], dict]:
    """Random train/val split after dropping labels seen fewer than ``min_label_count`` times in all ``rows``.

    Rows left without a label are dropped. Returns ``(train, val, report)``; the report has ``dropped_labels``,
    ``dropped_rows`` and ``val_only_labels`` (labels the training split lacks: ignored at validation).
    """
    counts = Counter(name for _, labels in rows for name in labels)
    kept, dropped_rows = [], 0
    for path, labels in rows:
        labels = {name: weight for name, weight in labels.items() if counts[name] >= min_label_count}
        if labels:
            kept.append((path, labels))
        else:
            dropped_rows += 1
    val_indices = set(random.Random(seed).sample(range(len(kept)), val_count(len(kept), val_ratio)))
    train = [row for i, row in enumerate(kept) if i not in val_indices]
    val = [row for i, row in enumerate(kept) if i in val_indices]
    train_labels = {name for _, labels in train for name in labels}
    report = {
        "dropped_labels": sorted(name for name, n in counts.items() if n < min_label_count),
        "dropped_rows": dropped_rows,
        "val_only_labels": sorted({name for _, labels in val for name in labels} - train_labels),
    }
    return train, val, report
