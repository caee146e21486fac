"""Continuing and evaluating checkpoints: weights that fit the model, the optimizer / scheduler / scaler / EMA
state, and the random streams."""

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import ModelEmaV3, NativeScaler
from torch import nn

import utils
from artifacts.checkpoint import Checkpoint, guess_architecture, load_checkpoint
from artifacts.run_folder import SCHEDULE_ARGS, ResumePoint, read_eval_weights, read_resume_point
from training.config import TrainConfig
from training.distributed import DistEnv
from training.metrics import Metric
from utils import UserError

__all__ = ["TrainingState", "check_fits", "epoch_seed", "evaluate_checkpoint", "load_resume_weights", "open_resume",
           "seed_streams"]


def check_fits(ckpt: Checkpoint, model: nn.Module) -> None:
    """Clear errors for a checkpoint of the same backbone with another head (``load_checkpoint`` does the rest)."""
    if ckpt.distillation != model.distillation:
        hint = ("add --distillation-type soft or hard (with a teacher to train)" if ckpt.distillation
                else "drop --distillation-type")
        state = "has" if ckpt.distillation else "has no"
        raise UserError(f"{ckpt.path} {state} a distillation head (head_dist): {hint}")
    if guess_architecture(ckpt.state_dict) != guess_architecture(model.state_dict()):
        return
    if ckpt.feature_dim is not None and ckpt.feature_dim != model.head_hidden_size:
        raise UserError(f"{ckpt.path} has feature_dim {ckpt.feature_dim}, the model {model.head_hidden_size}: "
                        f"pass --feature-dim {ckpt.feature_dim}")
    if ckpt.num_classes is not None and ckpt.num_classes != model.num_classes:
        raise UserError(f"{ckpt.path} has {ckpt.num_classes} classes, the dataset {model.num_classes}: use the "
                        "dataset it was trained on, or --finetune-from to train new heads")


def open_resume(cfg: TrainConfig) -> tuple[TrainConfig, ResumePoint | None]:
    """The ``--resume`` checkpoint of a training run, read once (before the dataset scan, so a bad path fails
    first): the configuration naming the file (a folder resolves to its newest loadable checkpoint) and the point.
    ``--eval`` and new runs read nothing here."""
    if not cfg.run.resume or cfg.run.eval_only:
        return cfg, None
    point = read_resume_point(cfg.run.resume, log=utils.print_main)
    return cfg.with_settings({"resume": str(point.path)}), point


def load_resume_weights(point: ResumePoint, model: nn.Module, class_names: list[str]) -> None:
    """Check the ``--resume`` checkpoint fits the dataset and the model, and load its model weights."""
    point.check_classes(class_names)
    ckpt = point.weights()
    check_fits(ckpt, model)
    load_checkpoint(ckpt, model, log=utils.print_main)


@dataclass
class TrainingState:
    """What training updates besides the weights: optimizer, learning-rate scheduler, AMP scaler, model EMA."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: NativeScaler | None = None
    ema: ModelEmaV3 | None = None

    def restore(self, point: ResumePoint, current_args: dict[str, Any]) -> None:
        """Load the checkpoint's state; the scheduler's only when no setting of the schedule changed since."""
        try:
            self.optimizer.load_state_dict(point.state("optimizer"))
        except (ValueError, KeyError) as err:
            raise UserError(f"the optimizer state in {point.path} does not fit this run ({err}); resume with the "
                            "checkpoint's --opt and --weight-decay") from None
        saved = point.args
        changed = [name for name in SCHEDULE_ARGS if name in saved and saved[name] != current_args.get(name)]
        if changed:
            flags = ", ".join("the learning rate (--lr x effective batch / 512)" if name == "scaled_lr"
                              else "--" + name.replace("_", "-") for name in changed)
            utils.print_main(f"note: {flags} changed since the checkpoint: the learning-rate schedule follows the "
                             "current flags")
        elif point.state("lr_scheduler") is not None:
            self.scheduler.load_state_dict(point.state("lr_scheduler"))
        if self.scaler is not None and point.state("scaler"):
            self.scaler.load_state_dict(point.state("scaler"))
        if self.ema is not None and point.has_ema:
            load_checkpoint(point.weights(ema=True), self.ema.module, log=utils.print_main)


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """Seed of a random stream (0: global RNGs, 1: data loader workers) of one process in one epoch."""
    return seed + 1009 * epoch + 1_000_003 * rank + 1_000_000_007 * stream


def seed_streams(point: ResumePoint | None, dist: DistEnv, seed: int, start_epoch: int) -> None:
    """Random streams: restored from the checkpoint, else seeded per process (augmentations differ between them)."""
    rng_states = point.state("rng_states") if point is not None else None
    if rng_states and len(rng_states) == dist.world_size:
        utils.set_rng_state(rng_states[dist.rank])
        return
    if point is not None:
        reason = (f"comes from {len(rng_states)} processes, this run has {dist.world_size}" if rng_states
                  else "stores no random-number state")
        utils.print_main(f"note: the checkpoint {reason}: random streams are re-seeded (results differ from an "
                         "uninterrupted run)")
    utils.seed_everything(epoch_seed(seed, start_epoch, dist.rank))


def evaluate_checkpoint(path: str, model: nn.Module, class_names: list[str],
                        evaluate_fn: Callable[[nn.Module, Metric], dict[str, float]],
                        metric_factory: Callable[[], Metric], device: torch.device) -> dict[str, Any]:
    """``--eval``: validation metrics of the checkpoint's model weights (and of its EMA weights, if stored).

    ``evaluate_fn(model, metric)`` runs the validation pass.
    """
    results = {}
    for name, ckpt in read_eval_weights(path, class_names).items():
        net = model if name == "model" else copy.deepcopy(model)
        check_fits(ckpt, net)
        load_checkpoint(ckpt, net, log=utils.print_main)
        stats = evaluate_fn(net.to(device), metric_factory())
        utils.print_main(f"{path} ({name} weights): {json.dumps(stats)}")
        results[name] = stats
    return results
