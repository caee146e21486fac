#!/usr/bin/env python3
"""Train an LSNet artist-style classifier on a prepared ``train/`` + ``val/`` dataset (single GPU, CPU or torchrun).

Examples::

    python train_artist_style.py --data-path dataset --model lsnet_t_artist --output-dir runs/t
    torchrun --standalone --nproc_per_node=4 train_artist_style.py --data-path dataset --output-dir runs/t
    python train_artist_style.py --data-path dataset --resume runs/t/checkpoint.pth --output-dir runs/t
    python train_artist_style.py --data-path dataset --eval --resume runs/t/model_best.pth
    python train_artist_style.py --data-path dataset --loss supcon --sampler class-balanced --samples-per-class 4
"""

import argparse

from torch import nn

import model  # noqa: F401  (registers the LSNet models with timm)
import utils
from data import SplitScan, build_dataset, scan_split
from data.images import median_short_side
from losses import DistillationLoss, build_classification_criterion
from training.config import TrainConfig
from training.distributed import start_process
from training.factory import build_metric_criterion, build_mixup, create_model, create_teacher, resolve_num_classes
from training.flags import TrainArgumentParser, add_common_args, add_distillation_args, add_embedding_args
from training.recipe import DataShape, prepare_recipe
from training.resume import open_resume
from training.trainer import Task, fit
from utils import UserError


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = TrainArgumentParser(description="Train an LSNet artist-style classifier (see docs: training).",
                                 add_help=add_help)
    add_common_args(parser)
    add_distillation_args(parser)
    add_embedding_args(parser)
    return parser


def scan(cfg: TrainConfig, is_train: bool, verbose: bool) -> SplitScan:
    """The verified images of ``--data-path``'s ``train/`` or ``val/``."""
    return scan_split(is_train, cfg.run.data_path, workers=cfg.run.num_workers, cache_dir=cfg.run.output_dir,
                      verbose=verbose)


def main(args: argparse.Namespace) -> dict:
    try:
        cfg, resume = open_resume(TrainConfig.from_args(args))
        dist = start_process(cfg.run.device, cfg.run.seed)
        val_scan = scan(cfg, False, dist.is_main)
        train_scan = None if cfg.run.eval_only else scan(cfg, True, dist.is_main)
        num_classes = resolve_num_classes(cfg.model.num_classes, len(val_scan.classes), cfg.run.data_path)
        extra_config = None
        if train_scan is not None:  # the recipe sees the scanned data; every transform is built after it
            side = median_short_side([path for path, _ in train_scan.samples])
            shape = DataShape.from_labels(train_scan.targets, num_classes, image_side=side)
            cfg, recipe = prepare_recipe(cfg, shape, dist.world_size, resume=resume)
            extra_config = {"recipe": recipe.as_dict()}
        dataset_train = build_dataset(train_scan, cfg.transform) if train_scan is not None else None
        dataset_val = build_dataset(val_scan, cfg.transform)
        net = create_model(cfg.model, num_classes, seed=cfg.run.seed, distillation=cfg.distill.enabled)
        return fit(cfg, dist, net, dataset_train, dataset_val, dataset_val.classes,
                   build_task(cfg, net, num_classes, extra_config), resume)
    finally:
        utils.cleanup_distributed()


def build_task(cfg: TrainConfig, net: nn.Module, num_classes: int, extra_config: dict | None = None) -> Task:
    """The training criterion: cross-entropy (with mixup and distillation as asked) or the metric ``--loss``;
    ``extra_config``: further ``config.json`` entries (the recipe)."""
    if cfg.loss.metric:
        mixing = [flag for flag in ("mixup", "cutmix") if flag in cfg.explicit and getattr(cfg.augment, flag) > 0]
        if mixing:
            raise UserError(f"--loss {cfg.loss.name} needs each image's own artist: drop --{' and --'.join(mixing)}"
                            " (mixup and cutmix are off with metric losses)")
        return Task(build_metric_criterion(cfg.loss, net, num_classes),
                    extra_config={**(extra_config or {}), "loss": cfg.loss.name})
    mixup_fn = build_mixup(cfg.augment, cfg.optim.batch_size, num_classes)
    criterion = build_classification_criterion(mixup_fn is not None, cfg.augment.smoothing)
    if cfg.distill.enabled and not cfg.run.eval_only:
        teacher = create_teacher(cfg.distill, num_classes)
        criterion = DistillationLoss(criterion, teacher, cfg.distill.type, cfg.distill.alpha, cfg.distill.tau)
    return Task(criterion, mixup_fn=mixup_fn, extra_config=extra_config)


if __name__ == "__main__":
    utils.run_cli(lambda: main(get_args_parser().parse_args()))
