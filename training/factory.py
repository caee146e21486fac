"""What a run is built from: the model (and its initial weights), the distillation teacher, mixup, the training
criterion (cross-entropy or a metric loss), the optimizer and the learning-rate schedule (timm's factories)."""

import functools
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

import utils
from artifacts.checkpoint import load_checkpoint, read_checkpoint
from losses import ArcFaceLoss, StyleEmbeddingLoss, SupConLoss
from model import load_pretrained_backbone
from model.lsnet_artist import ARTIST_MODELS
from training.config import HUB_WEIGHTS, AugmentConfig, DistillConfig, LossConfig, ModelConfig, OptimConfig
from training.layer_decay import layer_decay_groups
from utils import UserError

__all__ = ["build_metric_criterion", "build_mixup", "build_optimizer", "build_scheduler", "create_model",
           "create_teacher", "resolve_num_classes", "scale_lr"]


def resolve_num_classes(requested: int | None, dataset_classes: int, data_path: str) -> int:
    """``--num-classes`` when given (it must match the dataset), else the dataset's class count (at least 2)."""
    if dataset_classes < 2:
        raise UserError(f"{data_path} has {dataset_classes} class: a classifier needs at least 2 (with one, every "
                        "image is trivially that class); add another artist's images (prepare_dataset.py) or "
                        "another label (multi-label CSV)")
    if requested is not None and requested != dataset_classes:
        raise UserError(f"--num-classes {requested} but {data_path} has {dataset_classes} classes; drop "
                        "--num-classes (it is detected from the dataset)")
    return dataset_classes


def create_model(cfg: ModelConfig, num_classes: int, *, seed: int, distillation: bool = False) -> nn.Module:
    """The ``cfg.name`` network, initialised from ``cfg.pretrained`` (backbone) or ``cfg.finetune_from`` if given.

    Seeded with ``seed`` first, so every process starts from the same weights (the EMA copies agree too).
    """
    utils.seed_everything(seed)
    try:
        model = timm.create_model(cfg.name, num_classes=num_classes, feature_dim=cfg.feature_dim,
                                  use_projection=cfg.use_projection, distillation=distillation,
                                  drop_path_rate=cfg.drop_path)
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.pretrained == HUB_WEIGHTS:
        load_pretrained_backbone(model)
        utils.print_main(f"backbone initialised from the official weights ({model.pretrained_cfg.get('hf_hub_id')}); "
                         "heads and projection are new")
    elif cfg.pretrained:
        load_checkpoint(cfg.pretrained, model, backbone_only=True, log=utils.print_main)
        utils.print_main(f"backbone initialised from {cfg.pretrained}; heads and projection are new")
    elif cfg.finetune_from:
        load_checkpoint(cfg.finetune_from, model, reset_heads_on_mismatch=True, log=utils.print_main)
        utils.print_main(f"weights initialised from {cfg.finetune_from}")
    return model


def create_teacher(cfg: DistillConfig, num_classes: int) -> nn.Module:
    """The frozen teacher ``cfg.teacher_model`` loaded from ``cfg.teacher_path``; it must have ``num_classes``."""
    flag = f"--distillation-type {cfg.type}"
    if not cfg.teacher_model or not cfg.teacher_path:
        raise UserError(f"{flag} needs --teacher-model NAME and --teacher-path CHECKPOINT (a model trained on the "
                        "same classes)")
    if not timm.is_model(cfg.teacher_model):
        raise UserError(f"unknown --teacher-model {cfg.teacher_model!r}; use a timm or LSNet model name such as "
                        "lsnet_b_distill or lsnet_b_artist")
    ckpt = read_checkpoint(cfg.teacher_path)
    if ckpt.num_classes is not None and ckpt.num_classes != num_classes:
        raise UserError(f"the teacher {ckpt.path} has {ckpt.num_classes} classes but the dataset has {num_classes}; "
                        "distil from a teacher trained on the same classes")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if cfg.teacher_model.startswith("lsnet"):
        kwargs["distillation"] = ckpt.distillation
    if cfg.teacher_model in ARTIST_MODELS:
        kwargs["feature_dim"] = ckpt.feature_dim
    teacher = timm.create_model(cfg.teacher_model, **kwargs)
    load_checkpoint(ckpt, teacher)
    utils.print_main(f"teacher {cfg.teacher_model} loaded from {ckpt.path}")
    return teacher.eval().requires_grad_(False)


def build_mixup(cfg: AugmentConfig, batch_size: int, num_classes: int, multi_label: bool = False) -> Mixup | None:
    """timm's Mixup/CutMix (label smoothing included), or None when both are off."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None
    if batch_size % 2:
        raise UserError(f"mixup/cutmix pair images within a batch: --batch-size must be even, got {batch_size} "
                        "(or turn them off with --mixup 0 --cutmix 0)")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes, multi_label=multi_label)


def build_metric_criterion(cfg: LossConfig, model: nn.Module, num_classes: int) -> StyleEmbeddingLoss:
    """The criterion of a metric ``--loss``: the loss on the model's style vectors plus the head's linear probe."""
    dim = model.head_hidden_size
    if cfg.name == "supcon":
        metric: nn.Module = SupConLoss(cfg.temperature)
    else:
        subcenters = cfg.subcenters if cfg.name == "subcenter-arcface" else 1
        metric = ArcFaceLoss(num_classes, dim, scale=cfg.scale, margin=cfg.margin, subcenters=subcenters)
    return StyleEmbeddingLoss(metric, model.get_classifier().__call__)  # a method: the head stays the model's


def scale_lr(cfg: OptimConfig, world_size: int) -> float:
    """The used learning rate (printed): ``--lr-abs`` as given, else ``--lr`` scaled linearly from an effective
    batch of 512 to this run's."""
    effective_batch = cfg.batch_size * world_size * cfg.accumulation_steps
    if cfg.lr_abs is not None:
        utils.print_main(f"learning rate {cfg.lr_abs:.4g} (--lr-abs, used as given at effective batch "
                         f"{effective_batch}; --lr is not used)")
        return cfg.lr_abs
    scaled = cfg.lr * effective_batch / 512
    utils.print_main(f"learning rate {cfg.lr:g} x effective batch {effective_batch} ({cfg.batch_size} x "
                     f"{world_size} processes x {cfg.accumulation_steps} accumulation steps) / 512 = {scaled:.4g}")
    return scaled


def _unknown_name(err: ValueError) -> UserError:
    return UserError(f"{err}; use a timm optimizer (--opt adamw, sgd, lamb...) and scheduler (--sched cosine, "
                     "step, plateau...)")


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    criterion: nn.Module | None = None) -> torch.optim.Optimizer:
    """timm's optimizer ``cfg.opt`` at learning rate ``lr`` (``cfg.layer_decay``: layer-wise decay groups); a
    criterion's own parameters (ArcFace proxies) are a further group without weight decay."""
    kwargs = {**optimizer_kwargs(cfg), "lr": lr}
    if kwargs.pop("layer_decay", None) is not None:
        kwargs["param_group_fn"] = functools.partial(layer_decay_groups, weight_decay=cfg.weight_decay,
                                                     layer_decay=cfg.layer_decay)
    try:
        optimizer = create_optimizer_v2(model, **kwargs)
    except ValueError as err:
        raise _unknown_name(err) from None
    extra = [p for p in criterion.parameters() if p.requires_grad] if criterion is not None else []
    if extra:
        optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, seed: int, updates_per_epoch: int) -> Any:
    """timm's scheduler ``cfg.sched``, stepped per optimizer step (``plateau``: per epoch, on the validation
    metric); warm-up, decay and cooldown stay in epochs, the cooldown being the last epochs of ``cfg.epochs``."""
    kwargs = scheduler_kwargs(cfg)
    cooldown = cfg.cooldown_epochs if cfg.cooldown_epochs < cfg.epochs else 0
    kwargs.update(num_epochs=cfg.epochs - cooldown, cooldown_epochs=0, noise_seed=seed,
                  step_on_epochs=cfg.sched == "plateau", updates_per_epoch=updates_per_epoch)
    try:
        return create_scheduler_v2(optimizer, **kwargs)[0]
    except ValueError as err:
        raise _unknown_name(err) from None
