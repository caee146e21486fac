#!/usr/bin/env python3
"""Train an LSNet artist-style model on mixed styles with weighted labels (multi-label, sigmoid outputs).

The data are two ``image_path,labels`` annotation CSVs (see docs: multi-label); the training CSV defines the labels.
Everything but the data, the loss and the metrics is shared with ``train_artist_style.py`` (see :mod:`engine`).

Examples::

    python train_artist_multilabel.py --data-path images --train-ann train.csv --val-ann val.csv --output-dir runs/ml
    torchrun --standalone --nproc_per_node=4 train_artist_multilabel.py --data-path images --train-ann train.csv \\
        --val-ann val.csv --output-dir runs/ml
    python train_artist_multilabel.py --data-path images --train-ann train.csv --val-ann val.csv --eval \\
        --resume runs/ml
"""

import argparse
import csv
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

import engine
import model  # noqa: F401  (registers the LSNet models with timm)
import utils
from data import MultiLabelImageDataset, build_transform
from losses import multilabel_pos_weight
from utils import UserError

LABEL_STATS_FILE = "label_stats.csv"
BEST_KEY = "map_macro"
SHOWN_LABELS = 20  # label weights printed one by one up to this many labels


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an LSNet artist-style model on weighted multi-label annotations (see docs: multi-label).",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    engine.add_common_args(parser)
    group = parser.add_argument_group("multi-label")
    group.add_argument("--train-ann", required=True, metavar="CSV",
                       help="training annotations (image_path,labels); its labels are the model's classes")
    group.add_argument("--val-ann", required=True, metavar="CSV", help="validation annotations")
    group.add_argument("--label-delimiter", default=",", help="separator of the labels inside the labels field")
    group.add_argument("--threshold", type=float, default=0.4,
                       help="confidence at which a label counts as predicted (precision, recall, F1)")
    group.add_argument("--max-pos-weight", type=float, default=10.0,
                       help="upper clip of the per-label positive weight (negatives / positives) of the loss")
    # Mixup / cutmix mix the targets too: off unless asked for. Label smoothing only acts through them.
    parser.set_defaults(mixup=0.0, cutmix=0.0, smoothing=0.0)
    return parser


def label_statistics(dataset: MultiLabelImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per label (class id order): images where it is present, and the sum of its targets (weight / row max)."""
    indices = np.array([i for _, row_indices, _ in dataset.samples for i in row_indices], dtype=np.int64)
    values = np.array([v for _, _, row_values in dataset.samples for v in row_values], dtype=np.float64)
    num_labels = len(dataset.classes)
    return np.bincount(indices, minlength=num_labels), np.bincount(indices, weights=values, minlength=num_labels)


def write_label_stats(path: Path, classes: list[str], positives: np.ndarray, target_sums: np.ndarray,
                      pos_weight: torch.Tensor) -> None:
    """``label,positives,share,mean_weight,pos_weight``: a row per label in class id order."""
    total = max(int(positives.sum()), 1)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "positives", "share", "mean_weight", "pos_weight"])
        for name, count, target_sum, weight in zip(classes, positives, target_sums, pos_weight.tolist(), strict=True):
            mean = target_sum / count if count else 0.0
            writer.writerow([name, int(count), f"{count / total:.6g}", f"{mean:.6g}", f"{weight:.6g}"])


def report_pos_weight(classes: list[str], pos_weight: torch.Tensor, max_weight: float) -> None:
    clipped = int((pos_weight >= max_weight).sum())
    header = f"loss pos_weight per label (negatives / positives, clipped to {max_weight:g}; {clipped} clipped)"
    if len(classes) <= SHOWN_LABELS:
        utils.print_main(f"{header}: " + ", ".join(f"{name} {w:.3g}" for name, w in zip(classes, pos_weight.tolist(),
                                                                                      strict=True)))
    else:
        utils.print_main(f"{header}: min {pos_weight.min():.3g}, median {pos_weight.median():.3g}, max "
                         f"{pos_weight.max():.3g} (every label in {LABEL_STATS_FILE})")


def main(args: argparse.Namespace) -> dict:
    try:
        if not args.data_path:
            raise UserError("--data-path is required: the folder the image paths of the CSVs start from (. for the "
                            "current folder)")
        if not 0.0 < args.threshold < 1.0:
            raise UserError(f"--threshold is a confidence between 0 and 1, got {args.threshold}")
        if args.max_pos_weight < 1:
            raise UserError(f"--max-pos-weight must be at least 1, got {args.max_pos_weight}")
        device = engine.setup(args)
        verbose = utils.is_main_process()
        # The training CSV defines the labels, also for --eval (the checkpoint's labels are checked against them).
        dataset_train = MultiLabelImageDataset(args.train_ann, args.data_path, transform=build_transform(True, args),
                                               label_delimiter=args.label_delimiter, verbose=verbose)
        dataset_val = MultiLabelImageDataset(args.val_ann, args.data_path, classes=dataset_train.classes,
                                             transform=build_transform(False, args),
                                             label_delimiter=args.label_delimiter, verbose=verbose)
        classes = dataset_train.classes
        num_classes = engine.resolve_num_classes(args, len(classes))
        positives, target_sums = label_statistics(dataset_train)
        pos_weight = multilabel_pos_weight(torch.from_numpy(positives), len(dataset_train), args.max_pos_weight)
        if not args.eval:
            utils.print_main(f"{len(classes)} labels; {len(dataset_train)} training and {len(dataset_val)} validation "
                             "images")
            report_pos_weight(classes, pos_weight, args.max_pos_weight)
            if verbose and args.output_dir:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                write_label_stats(Path(args.output_dir) / LABEL_STATS_FILE, classes, positives, target_sums,
                                  pos_weight)
        if args.smoothing > 0 and not (args.mixup > 0 or args.cutmix > 0):
            utils.print_main("note: --smoothing acts only with --mixup / --cutmix in multi-label training")
        net = engine.create_model(args, num_classes)
        mixup_fn = engine.build_mixup(args, num_classes, multi_label=True)
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        return engine.fit(args, net, dataset_train, dataset_val, classes, device=device, criterion=criterion,
                          mixup_fn=mixup_fn, eval_criterion=criterion,
                          metric_factory=functools.partial(engine.MultiLabelMetrics, threshold=args.threshold),
                          best_key=BEST_KEY, extra_config={"multi_label": True, "threshold": args.threshold})
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(lambda: main(get_args_parser().parse_args()))
