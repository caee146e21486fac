#!/usr/bin/env python3
"""Train an LSNet artist-style model on mixed styles with weighted labels (multi-label, sigmoid outputs).

The data are two ``image_path,labels`` annotation CSVs (see docs: multi-label); the training CSV defines the labels.
Everything but the data, the loss and the metrics is shared with ``train_artist_style.py`` (see :mod:`training`).

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

import model  # noqa: F401  (registers the LSNet models with timm)
import utils
from data import MultiLabelImageDataset, annotation_counts, build_transform
from losses import multilabel_pos_weight
from training.config import TrainConfig
from training.distributed import start_process
from training.factory import build_mixup, create_model, resolve_num_classes
from training.flags import TrainArgumentParser, add_common_args, add_multilabel_args
from training.metrics import MultiLabelMetrics
from training.recipe import DataShape, prepare_recipe
from training.resume import open_resume
from training.trainer import Task, fit

LABEL_STATS_FILE = "label_stats.csv"
BEST_KEY = "map_macro"
SHOWN_LABELS = 20  # label weights printed one by one up to this many labels


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = TrainArgumentParser(
        description="Train an LSNet artist-style model on weighted multi-label annotations (see docs: multi-label).",
        add_help=add_help,
    )
    add_common_args(parser)
    add_multilabel_args(parser)
    return parser


def label_statistics(dataset: MultiLabelImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per label (class id order): images where it is present, and the sum of its targets (weight / row max)."""
    indices = np.array([i for _, row_indices, _ in dataset.samples for i in row_indices], dtype=np.int64)
    values = np.array([v for _, _, row_values in dataset.samples for v in row_values], dtype=np.float64)
    num_labels = len(dataset.classes)
    return np.bincount(indices, minlength=num_labels), np.bincount(indices, weights=values, minlength=num_labels)


def write_label_stats(path: Path, classes: list[str], positives: np.ndarray, target_sums: np.ndarray,
                      pos_weight: torch.Tensor) -> None:
    """``label,positives,share,mean_weight,pos_weight``: a row per label in class id order (a label starting with
    ``= + - @`` gets a ``'`` in front, so a spreadsheet shows it as text)."""
    total = max(int(positives.sum()), 1)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "positives", "share", "mean_weight", "pos_weight"])
        for name, count, target_sum, weight in zip(classes, positives, target_sums, pos_weight.tolist(), strict=True):
            mean = target_sum / count if count else 0.0
            writer.writerow([utils.spreadsheet_safe(name), int(count), f"{count / total:.6g}", f"{mean:.6g}",
                             f"{weight:.6g}"])


def report_pos_weight(classes: list[str], pos_weight: torch.Tensor, max_weight: float) -> None:
    clipped = int((pos_weight >= max_weight).sum())
    header = f"loss pos_weight per label (negatives / positives, clipped to {max_weight:g}; {clipped} clipped)"
    if len(classes) <= SHOWN_LABELS:
        utils.print_main(f"{header}: " + ", ".join(f"{name} {w:.3g}" for name, w in zip(classes, pos_weight.tolist(),
                                                                                      strict=True)))
    else:
        utils.print_main(f"{header}: min {pos_weight.min():.3g}, median {pos_weight.median():.3g}, max "
                         f"{pos_weight.max():.3g} (every label in {LABEL_STATS_FILE})")


def load_datasets(cfg: TrainConfig, verbose: bool) -> tuple[MultiLabelImageDataset, MultiLabelImageDataset]:
    """Training and validation sets; the training CSV defines the labels, also for ``--eval`` (the checkpoint's
    labels are checked against them)."""
    ml = cfg.multilabel
    common = dict(label_delimiter=ml.label_delimiter, verbose=verbose, allow_outside_root=ml.allow_outside_root,
                  workers=cfg.run.num_workers, cache_dir=cfg.run.output_dir)
    train = MultiLabelImageDataset(ml.train_ann, cfg.run.data_path, transform=build_transform(True, cfg.transform),
                                   **common)
    val = MultiLabelImageDataset(ml.val_ann, cfg.run.data_path, classes=train.classes,
                                 transform=build_transform(False, cfg.transform), **common)
    return train, val


def main(args: argparse.Namespace) -> dict:
    try:
        cfg, resume = open_resume(TrainConfig.from_args(args))
        ml = cfg.multilabel
        dist = start_process(cfg.run.device, cfg.run.seed)
        extra_config = {"multi_label": True, "threshold": ml.threshold}
        if not cfg.run.eval_only:  # the same recipe logic as single-label training, on the CSV's label counts
            images, label_counts = annotation_counts(ml.train_ann, ml.label_delimiter)
            cfg, recipe = prepare_recipe(cfg, DataShape.from_counts(label_counts, images=images), dist.world_size,
                                         multi_label=True, resume=resume)
            extra_config["recipe"] = recipe.as_dict()
        dataset_train, dataset_val = load_datasets(cfg, dist.is_main)
        classes = dataset_train.classes
        num_classes = resolve_num_classes(cfg.model.num_classes, len(classes), cfg.run.data_path)
        MultiLabelMetrics.check_memory(len(dataset_val), num_classes)
        positives, target_sums = label_statistics(dataset_train)
        pos_weight = multilabel_pos_weight(torch.from_numpy(positives), len(dataset_train), ml.max_pos_weight)
        if not cfg.run.eval_only:
            utils.print_main(f"{len(classes)} labels; {len(dataset_train)} training and {len(dataset_val)} validation "
                             "images")
            report_pos_weight(classes, pos_weight, ml.max_pos_weight)
            if dist.is_main and cfg.run.output_dir:
                Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
                write_label_stats(Path(cfg.run.output_dir) / LABEL_STATS_FILE, classes, positives, target_sums,
                                  pos_weight)
        if cfg.augment.smoothing > 0 and not (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0):
            utils.print_main("note: --smoothing acts only with --mixup / --cutmix in multi-label training")
        net = create_model(cfg.model, num_classes, seed=cfg.run.seed)
        mixup_fn = build_mixup(cfg.augment, cfg.optim.batch_size, num_classes, multi_label=True)
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        task = Task(criterion, mixup_fn=mixup_fn, eval_criterion=criterion,
                    metric_factory=functools.partial(MultiLabelMetrics, threshold=ml.threshold), best_key=BEST_KEY,
                    extra_config=extra_config)
        return fit(cfg, dist, net, dataset_train, dataset_val, classes, task, resume)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(lambda: main(get_args_parser().parse_args()))
