"""Which settings each training script has: argument groups generated from the declarations in
:mod:`training.config` (one group per configuration section)."""

import argparse

from training.config import (
    AugmentConfig,
    DistillConfig,
    EmaConfig,
    LossConfig,
    ModelConfig,
    MultiLabelConfig,
    OptimConfig,
    RunConfig,
    SamplerConfig,
)
from training.settings import SettingsParser, add_section

__all__ = ["TrainArgumentParser", "add_common_args", "add_distillation_args", "add_embedding_args",
           "add_multilabel_args"]

TrainArgumentParser = SettingsParser  # the training scripts' parser: flags plus --config run.yaml


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by the training scripts: model, optimisation, augmentation, EMA and run control."""
    for section, title in ((ModelConfig, "model"), (OptimConfig, "optimisation"), (AugmentConfig, "augmentation"),
                           (EmaConfig, "model EMA"), (RunConfig, "run control")):
        add_section(parser, section, title)
    return parser


def add_distillation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeiT-style knowledge distillation flags (single-label training)."""
    return add_section(parser, DistillConfig, "distillation")


def add_embedding_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The loss (cross-entropy or a metric loss on normalised style vectors) and the batch sampler."""
    add_section(parser, LossConfig, "loss (see docs/galleries.md)")
    return add_section(parser, SamplerConfig, "sampler")


def add_multilabel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of multi-label training: the annotation CSVs, the threshold and the loss weights."""
    add_section(parser, MultiLabelConfig, "multi-label")
    # Mixup / cutmix mix the targets too: off unless asked for. Label smoothing only acts through them.
    parser.set_defaults(mixup=0.0, cutmix=0.0, smoothing=0.0)
    return parser
