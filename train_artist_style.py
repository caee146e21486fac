#!/usr/bin/env python3
"""Train an LSNet artist-style classifier on a prepared ``train/`` + ``val/`` dataset (single GPU, CPU or torchrun).

Examples::

    python train_artist_style.py --data-path dataset --model lsnet_t_artist --output-dir runs/t
    torchrun --standalone --nproc_per_node=4 train_artist_style.py --data-path dataset --output-dir runs/t
    python train_artist_style.py --data-path dataset --resume runs/t/checkpoint.pth --output-dir runs/t
    python train_artist_style.py --data-path dataset --eval --resume runs/t/model_best.pth
"""

import argparse

import engine
import model  # noqa: F401  (registers the LSNet models with timm)
import utils
from data import build_dataset
from losses import DistillationLoss, build_classification_criterion


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an LSNet artist-style classifier (see docs: training).", add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    engine.add_common_args(parser)
    engine.add_distillation_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    try:
        device = engine.setup(args)
        verbose = utils.is_main_process()
        dataset_val, num_classes = build_dataset(False, args, verbose=verbose)
        dataset_train = None if args.eval else build_dataset(True, args, verbose=verbose)[0]
        num_classes = engine.resolve_num_classes(args, num_classes)
        distillation = args.distillation_type != "none"
        net = engine.create_model(args, num_classes, distillation=distillation)
        mixup_fn = engine.build_mixup(args, num_classes)
        criterion = build_classification_criterion(mixup_fn is not None, args.smoothing)
        if distillation and not args.eval:
            teacher = engine.create_teacher(args, num_classes)
            criterion = DistillationLoss(criterion, teacher, args.distillation_type, args.distillation_alpha,
                                         args.distillation_tau)
        return engine.fit(args, net, dataset_train, dataset_val, dataset_val.classes, device=device,
                          criterion=criterion, mixup_fn=mixup_fn)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(lambda: main(get_args_parser().parse_args()))
