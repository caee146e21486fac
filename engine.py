"""Training and evaluation loops, the flags every training script shares, and the training job that wires them.

A training script builds its datasets, model and loss, then calls :func:`fit`. What differs between scripts (the
loss, the validation metric and the metric that selects ``model_best.pth``) is passed in; everything else (output
files, checkpoints and resume, EMA, AMP, accumulation, distributed training, logging) is shared.
"""

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
from timm.data import Mixup
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

import utils
from data.class_mapping import CLASS_MAPPING_FILE, compare_class_mappings, read_class_mapping, write_class_mapping
from data.datasets import EVAL_CROP_PCT
from data.samplers import RASampler
from losses import DISTILLATION_TYPES, DistillationLoss
from model.lsnet_artist import ARTIST_MODELS
from utils import BEST_FILE, CHECKPOINT_FILE, MODEL_FOLDER_FILES, UserError

__all__ = [
    "Metric", "MultiLabelMetrics", "TopKAccuracy", "add_common_args", "add_distillation_args", "average_precision",
    "build_mixup", "create_model", "create_teacher", "evaluate", "fit", "resolve_num_classes", "setup",
    "train_one_epoch",
]

LOG_FILE = "train_log.txt"
ARGS_FILE = "args.json"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
# Flags that define the learning-rate schedule: when one changed since the checkpoint, resume follows the new one.
SCHEDULE_ARGS = ("sched", "epochs", "scaled_lr", "min_lr", "warmup_lr", "warmup_epochs", "cooldown_epochs",
                 "decay_epochs", "decay_rate", "lr_noise", "lr_noise_pct", "lr_noise_std", "seed")


# --------------------------------------------------------------------------------------------- flags


def _optional_str(value: str) -> str | None:
    return None if value.lower() in ("", "none") else value


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by the training scripts: model, optimisation, augmentation, EMA and run control."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="lsnet_t_artist", metavar="NAME", help=f"one of {', '.join(ARTIST_MODELS)}")
    group.add_argument("--input-size", type=int, default=None,
                       help="training / evaluation image size (default: the model's, 224; 448 for *_448)")
    group.add_argument("--feature-dim", type=int, default=None,
                       help="size of the style feature vector (default: the backbone's last embed dim)")
    group.add_argument("--use-projection", dest="use_projection", action="store_true", default=True,
                       help="project the pooled feature to --feature-dim (default)")
    group.add_argument("--no-projection", dest="use_projection", action="store_false",
                       help="no projection (--feature-dim must then equal the backbone dim)")
    group.add_argument("--num-classes", type=int, default=None, help="default: the number of classes of the dataset")
    group.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    group.add_argument("--pretrained", default=None, metavar="PATH",
                       help="initialise the backbone from an official LSNet ImageNet checkpoint (heads are new)")
    group.add_argument("--finetune-from", default=None, metavar="PATH",
                       help="initialise from a model checkpoint (weights only; heads reset if the classes differ)")
    group.add_argument("--finetune", action="store_true",
                       help="evaluate with a plain resize to --input-size instead of resize + center crop")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--batch-size", type=int, default=256, help="per process")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--accumulation-steps", type=int, default=1,
                       help="micro-batches per optimizer step (effective batch = batch x processes x this)")
    group.add_argument("--opt", default="adamw", help="timm optimizer name")
    group.add_argument("--opt-eps", type=float, default=1e-8)
    group.add_argument("--opt-betas", type=float, nargs="+", default=None)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.025)
    group.add_argument("--clip-grad", type=float, default=0.02, help="clipping value / norm / AGC factor (0: off)")
    group.add_argument("--clip-mode", default="agc", choices=("norm", "value", "agc"))
    group.add_argument("--sched", default="cosine", help="timm scheduler name")
    group.add_argument("--lr", type=float, default=1e-3,
                       help="learning rate for an effective batch of 512 (scaled linearly to the actual one)")
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--warmup-epochs", type=int, default=5)
    group.add_argument("--cooldown-epochs", type=int, default=10,
                       help="last epochs of --epochs held at --min-lr (ignored unless smaller than --epochs)")
    group.add_argument("--decay-epochs", type=float, default=30, help="step schedule: epochs between decays")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, help="noise on/off epochs as fractions")
    group.add_argument("--lr-noise-pct", type=float, default=0.67)
    group.add_argument("--lr-noise-std", type=float, default=1.0)

    group = parser.add_argument_group("augmentation")
    group.add_argument("--color-jitter", type=float, default=0.4)
    group.add_argument("--aa", type=_optional_str, default="rand-m9-mstd0.5-inc1", help="timm auto-augment; none: off")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--train-interpolation", default="bicubic")
    group.add_argument("--repeated-aug", dest="repeated_aug", action="store_true", default=True,
                       help="repeated augmentation (3 views per image and epoch, on different processes; default)")
    group.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false")
    group.add_argument("--ThreeAugment", action="store_true", help="DeiT III augmentation instead of RandAugment")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--remode", default="pixel")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--resplit", action="store_true", help="no random erasing of the first augmentation split")
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))

    group = parser.add_argument_group("model EMA")
    group.add_argument("--model-ema", dest="model_ema", action="store_true", default=True,
                       help="keep an exponential moving average of the weights (default)")
    group.add_argument("--no-model-ema", dest="model_ema", action="store_false")
    group.add_argument("--model-ema-decay", type=float, default=0.99996)
    group.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU (not evaluated)")

    group = parser.add_argument_group("run control")
    group.add_argument("--data-path", default=None,
                       help="dataset folder with train/ and val/ (prepare_dataset.py); multi-label: the folder the "
                            "image paths of the annotation CSVs start from")
    group.add_argument("--output-dir", "--output_dir", default="output", help="where checkpoints and logs go")
    group.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--resume", default=None, metavar="PATH", help="checkpoint.pth (or its folder) to continue")
    group.add_argument("--start-epoch", "--start_epoch", type=int, default=0, help="first epoch (resume sets it)")
    group.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint on val/")
    group.add_argument("--save-every", type=int, default=0, metavar="N", help="keep checkpoint_epochN.pth (0: off)")
    group.add_argument("--eval-every", type=int, default=1, metavar="N", help="validate every N epochs (and the last)")
    group.add_argument("--num-workers", "--num_workers", type=int, default=10, help="data loading processes")
    group.add_argument("--pin-mem", dest="pin_mem", action="store_true", default=True,
                       help="pin CPU memory for faster GPU transfer (default)")
    group.add_argument("--no-pin-mem", dest="pin_mem", action="store_false")
    group.add_argument("--amp", dest="amp", action="store_true", default=None,
                       help="mixed precision: float16 + grad scaler on CUDA, bfloat16 on CPU (default: on for CUDA)")
    group.add_argument("--no-amp", dest="amp", action="store_false")
    group.add_argument("--dist-eval", action="store_true", help="split validation over the processes")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format for the model and its inputs: faster convolutions on most "
                            "CPUs and on GPUs with --amp")
    group.add_argument("--print-freq", type=int, default=50, help="steps between progress lines (when not a TTY)")
    return parser


def add_distillation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeiT-style knowledge distillation flags (single-label training)."""
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher-model", default=None, metavar="NAME",
                       help="teacher architecture, e.g. lsnet_b_distill or lsnet_b_artist")
    group.add_argument("--teacher-path", default=None, metavar="PATH", help="teacher checkpoint (same classes)")
    group.add_argument("--distillation-type", default="none", choices=DISTILLATION_TYPES)
    group.add_argument("--distillation-alpha", type=float, default=0.5)
    group.add_argument("--distillation-tau", type=float, default=1.0)
    return parser


# --------------------------------------------------------------------------------------------- set-up


def setup(args: argparse.Namespace) -> torch.device:
    """Check the flags, join the process group (torchrun), seed, and fill model-dependent defaults.

    Returns this process's device. Sets ``args.input_size`` (model default) and ``args.amp`` (on for CUDA).
    """
    if args.model not in ARTIST_MODELS:
        raise UserError(f"unknown --model {args.model!r}; use one of {', '.join(ARTIST_MODELS)}")
    if not args.data_path:
        raise UserError("--data-path is required: the folder with train/ and val/ made by prepare_dataset.py")
    for flag, value, minimum in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 1),
                                 ("--accumulation-steps", args.accumulation_steps, 1),
                                 ("--eval-every", args.eval_every, 1), ("--save-every", args.save_every, 0),
                                 ("--num-workers", args.num_workers, 0)):
        if value < minimum:
            raise UserError(f"{flag} must be at least {minimum}, got {value}")
    if args.pretrained and args.finetune_from:
        raise UserError("--pretrained and --finetune-from both initialise the weights; pass only one")
    if args.eval and not args.resume:
        raise UserError("--eval needs --resume PATH: the checkpoint (or model folder) to evaluate")
    if args.resume:  # fail before the dataset scan; a folder resolves to the checkpoint file in it
        args.resume = str(utils.find_checkpoint(args.resume, MODEL_FOLDER_FILES if args.eval else (CHECKPOINT_FILE,)))
    device = utils.init_distributed_mode(args)
    utils.seed_everything(args.seed)
    if args.input_size is None:
        args.input_size = int(get_pretrained_cfg(args.model).input_size[-1])
    if args.amp is None:
        args.amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def resolve_num_classes(args: argparse.Namespace, dataset_classes: int) -> int:
    """``--num-classes`` when given (it must match the dataset), else the dataset's class count."""
    if args.num_classes is not None and args.num_classes != dataset_classes:
        raise UserError(f"--num-classes {args.num_classes} but {args.data_path} has {dataset_classes} classes; "
                        "drop --num-classes (it is detected from the dataset)")
    args.num_classes = dataset_classes
    return dataset_classes


def create_model(args: argparse.Namespace, num_classes: int, distillation: bool = False) -> nn.Module:
    """The ``--model`` network, initialised from ``--pretrained`` (backbone) or ``--finetune-from`` if given.

    Seeded with ``--seed`` first, so every process starts from the same weights (the EMA copies agree too).
    """
    utils.seed_everything(args.seed)
    try:
        model = timm.create_model(args.model, num_classes=num_classes, feature_dim=args.feature_dim,
                                  use_projection=args.use_projection, distillation=distillation,
                                  drop_path_rate=args.drop_path)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.pretrained:
        utils.load_checkpoint(args.pretrained, model, backbone_only=True, log=utils.print_main)
        utils.print_main(f"backbone initialised from {args.pretrained}; heads and projection are new")
    elif args.finetune_from:
        utils.load_checkpoint(args.finetune_from, model, reset_heads_on_mismatch=True, log=utils.print_main)
        utils.print_main(f"weights initialised from {args.finetune_from}")
    return model


def create_teacher(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The frozen ``--teacher-model`` loaded from ``--teacher-path``; it must have ``num_classes`` outputs."""
    flag = f"--distillation-type {args.distillation_type}"
    if not args.teacher_model or not args.teacher_path:
        raise UserError(f"{flag} needs --teacher-model NAME and --teacher-path CHECKPOINT (a model trained on the "
                        "same classes)")
    if not timm.is_model(args.teacher_model):
        raise UserError(f"unknown --teacher-model {args.teacher_model!r}; use a timm or LSNet model name such as "
                        "lsnet_b_distill or lsnet_b_artist")
    ckpt = utils.read_checkpoint(args.teacher_path)
    if ckpt.num_classes is not None and ckpt.num_classes != num_classes:
        raise UserError(f"the teacher {ckpt.path} has {ckpt.num_classes} classes but the dataset has {num_classes}; "
                        "distil from a teacher trained on the same classes")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if args.teacher_model.startswith("lsnet"):
        kwargs["distillation"] = ckpt.distillation
    if args.teacher_model in ARTIST_MODELS:
        kwargs["feature_dim"] = ckpt.feature_dim
    teacher = timm.create_model(args.teacher_model, **kwargs)
    utils.load_checkpoint(ckpt, teacher)
    utils.print_main(f"teacher {args.teacher_model} loaded from {ckpt.path}")
    return teacher.eval().requires_grad_(False)


def build_mixup(args: argparse.Namespace, num_classes: int, multi_label: bool = False) -> Mixup | None:
    """timm's Mixup/CutMix from the flags (label smoothing included), or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise UserError(f"mixup/cutmix pair images within a batch: --batch-size must be even, got {args.batch_size} "
                        "(or turn them off with --mixup 0 --cutmix 0)")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes, multi_label=multi_label)


# --------------------------------------------------------------------------------------------- loops


class Metric(Protocol):
    """Validation metric accumulated over batches: ``update`` per batch, ``compute`` once at the end."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None: ...

    def compute(self, distributed: bool = False) -> dict[str, float]:
        """Final values; with ``distributed`` the batches of every process are combined."""
        ...


class TopKAccuracy:
    """Single-label top-k accuracy in percent (``acc1``, ``acc5``); k is capped at the number of classes."""

    def __init__(self, topk: Sequence[int] = (1, 5)):
        self.topk = tuple(topk)
        self.correct = torch.zeros(len(self.topk), dtype=torch.float64)
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        maxk = min(max(self.topk), output.shape[1])
        hits = output.topk(maxk, dim=1).indices.eq(target.view(-1, 1))
        counts = torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in self.topk])
        self.correct = self.correct.to(output.device) + counts
        self.count += target.shape[0]

    def compute(self, distributed: bool = False) -> dict[str, float]:
        totals = torch.cat([self.correct, self.correct.new_tensor([self.count])])
        if distributed:
            utils.all_reduce_sum(totals)
        correct, count = totals[:-1].tolist(), max(totals[-1].item(), 1)
        return {f"acc{k}": 100.0 * c / count for k, c in zip(self.topk, correct, strict=True)}


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each column of ``scores`` (N, C) against the boolean ``targets`` (N, C).

    scikit-learn's definition: the sum over decreasing score thresholds of (recall increase) x precision, with tied
    scores forming one threshold. NaN for a column without a positive.
    """
    n = scores.shape[0]
    order = scores.argsort(dim=0, descending=True, stable=True)
    sorted_scores = scores.gather(0, order)
    hits = targets.gather(0, order).double()
    precision = hits.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    # Tied scores are one threshold: every position takes the precision at the end of its run of equal scores.
    positions = torch.arange(n).unsqueeze(1).expand_as(sorted_scores)
    run_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    run_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end_index = torch.where(run_end, positions, n).flip(0).cummin(dim=0).values.flip(0)
    return (hits * precision.gather(0, end_index)).sum(0) / hits.sum(0)


class MultiLabelMetrics:
    """Multi-label metrics on label presence (target > 0), from sigmoid scores; fractions in [0, 1].

    ``map_micro``/``map_macro``: average precision over all (image, label) pairs / mean per-label AP, where labels
    without a positive in the evaluated split are left out of every macro value (``labels_without_positives``
    counts them). ``precision``/``recall``/``f1`` ``_micro``/``_macro`` at ``threshold``: micro sums the counts
    over all labels; macro averages the per-label values (precision 0 for a label never predicted).
    """

    def __init__(self, threshold: float = 0.4):
        self.threshold = threshold
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.scores.append(output.detach().float().sigmoid().cpu())
        self.targets.append((target > 0).cpu())

    def compute(self, distributed: bool = False) -> dict[str, float]:
        parts = [(self.scores, self.targets)]
        if distributed:
            parts = utils.all_gather_objects(parts[0])
        scores = torch.cat([batch for process_scores, _ in parts for batch in process_scores])
        targets = torch.cat([batch for _, process_targets in parts for batch in process_targets])
        present = targets.any(dim=0)
        predicted = scores >= self.threshold
        tp = (predicted & targets).sum(0).double()
        fp = (predicted & ~targets).sum(0).double()
        fn = (~predicted & targets).sum(0).double()

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            return torch.where(den > 0, num / den.clamp(min=1), 0.0)

        def macro(values: torch.Tensor) -> float:
            return values[present].mean().item() if present.any() else 0.0

        return {
            "map_macro": macro(average_precision(scores, targets)),
            "map_micro": average_precision(scores.reshape(-1, 1), targets.reshape(-1, 1)).nan_to_num(0.0).item(),
            "f1_macro": macro(ratio(2 * tp, 2 * tp + fp + fn)),
            "f1_micro": ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()).item(),
            "precision_macro": macro(ratio(tp, tp + fp)),
            "precision_micro": ratio(tp.sum(), tp.sum() + fp.sum()).item(),
            "recall_macro": macro(ratio(tp, tp + fn)),
            "recall_micro": ratio(tp.sum(), tp.sum() + fn.sum()).item(),
            "labels_without_positives": int((~present).sum()),
        }


def _global_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over all processes (a sync point, so every process sees the same non-finite loss)."""
    value = value.detach().float().reshape(1).clone()
    return utils.all_reduce_sum(value).item() / utils.get_world_size()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    *,
    loss_scaler: NativeScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    accumulation_steps: int = 1,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    model_ema: ModelEmaV3 | None = None,
    mixup_fn: Callable | None = None,
    set_training_mode: bool = True,
    print_freq: int = 50,
    header: str | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
) -> dict[str, float]:
    """One pass over ``data_loader``; returns the mean training ``loss`` and the last ``lr``.

    ``criterion(outputs, targets)`` (a :class:`~losses.DistillationLoss` is called with the inputs first). The
    optimizer steps once per ``accumulation_steps`` micro-batches, on the mean of their losses (a shorter last group
    is averaged over its own size); non-final micro-batches skip the DDP gradient all-reduce (``no_sync``). With
    ``loss_scaler`` (CUDA float16) backward, clipping and the step go through the scaler. A non-finite loss on any
    process raises :class:`UserError` naming the epoch and step (0-based ``epoch``, shown 1-based). Batches are
    moved to ``device`` in ``memory_format`` (``torch.channels_last`` for a channels-last model).
    """
    model.train(set_training_mode)
    num_steps = len(data_loader)
    world_size = utils.get_world_size()
    progress = utils.Progress(num_steps, header or f"Epoch {epoch + 1}", print_freq)
    with_inputs = isinstance(criterion, DistillationLoss)
    no_sync = getattr(model, "no_sync", None)
    loss_sum = 0.0
    images = 0
    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in enumerate(data_loader):
        samples = samples.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        group_start = step - step % accumulation_steps
        group_size = min(accumulation_steps, num_steps - group_start)
        update = step == group_start + group_size - 1
        with nullcontext() if update or no_sync is None else no_sync():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(samples)
                loss = criterion(samples, outputs, targets) if with_inputs else criterion(outputs, targets)
            loss_value = _global_mean(loss)
            if not math.isfinite(loss_value):
                progress.close()
                raise UserError(
                    f"loss is {loss_value} at epoch {epoch + 1}, step {step + 1}/{num_steps}: training stopped and "
                    "this epoch was not saved (the last checkpoint is intact); lower --lr, raise --warmup-epochs or "
                    "--clip-grad, or train without --amp"
                )
            loss = loss / group_size
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=model.parameters(),
                            need_update=update)
            else:
                loss.backward()
                if update:
                    if clip_grad:
                        dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
                    optimizer.step()
        if update:
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(unwrap_model(model))
        batch = samples.shape[0] * world_size
        loss_sum += loss_value * batch
        images += batch
        progress.update(batch, lr=optimizer.param_groups[0]["lr"], loss=loss_value)
    progress.close()
    return {"loss": loss_sum / max(images, 1), "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data_loader: DataLoader,
    device: torch.device,
    criterion: nn.Module | None = None,
    metric: Metric | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    distributed: bool = False,
    print_freq: int = 50,
    header: str = "Val",
    memory_format: torch.memory_format = torch.preserve_format,
) -> dict[str, float]:
    """Mean ``loss`` (default: cross-entropy) and the ``metric`` values (default: top-1/top-5 accuracy).

    With ``distributed`` the loader holds this process's shard and the results are combined over processes.
    Batches are moved to ``device`` in ``memory_format``.
    """
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    metric = metric if metric is not None else TopKAccuracy()
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, image count
    progress = utils.Progress(len(data_loader), header, print_freq)
    scale = utils.get_world_size() if distributed else 1
    for images, target in data_loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        loss = criterion(output, target)
        totals += torch.stack([loss.double() * target.shape[0], loss.new_tensor(target.shape[0], dtype=torch.float64)])
        metric.update(output, target)
        progress.update(images.shape[0] * scale)
    progress.close()
    if distributed:
        utils.all_reduce_sum(totals)
    return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), **metric.compute(distributed)}


# --------------------------------------------------------------------------------------------- the training job


def _epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """Seed of a random stream (0: global RNGs, 1: data loader workers) of one process in one epoch."""
    return seed + 1009 * epoch + 1_000_003 * rank + 1_000_000_007 * stream


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as a dict of JSON / ``weights_only`` friendly values."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)
    return {key: plain(value) for key, value in vars(args).items()}


def model_config(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """``config.json``: what inference needs to rebuild the model and its preprocessing."""
    cfg = model.pretrained_cfg
    return {
        "model": args.model, "num_classes": model.num_classes, "feature_dim": model.head_hidden_size,
        "use_projection": model.use_projection, "distillation": model.distillation, "input_size": args.input_size,
        "mean": list(cfg["mean"]), "std": list(cfg["std"]),
        "crop_pct": 1.0 if args.finetune else EVAL_CROP_PCT, "crop_mode": "squash" if args.finetune else "center",
        "interpolation": "bicubic", "checkpoint": BEST_FILE, "class_mapping": CLASS_MAPPING_FILE,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _checkpoint_classes(raw: dict[str, Any], path: Path) -> list[str] | None:
    """Class names stored in a checkpoint, else those of the ``class_mapping.csv`` next to it."""
    if raw.get("class_names"):
        return list(raw["class_names"])
    mapping = path.parent / CLASS_MAPPING_FILE
    return read_class_mapping(mapping) if mapping.is_file() else None


def _check_classes(expected: Sequence[str] | None, actual: Sequence[str], source: str, action: str) -> None:
    if expected is None:
        return
    differences = compare_class_mappings(expected, actual, expected_label=source, actual_label="dataset")
    if differences:
        raise UserError(f"the classes of {source} differ from the dataset's ({'; '.join(differences)}): {action}")


def _check_fits(ckpt: utils.Checkpoint, model: nn.Module) -> None:
    """Clear errors for a checkpoint of the same backbone with another head (``load_checkpoint`` does the rest)."""
    if ckpt.distillation != model.distillation:
        hint = ("add --distillation-type soft or hard (with a teacher to train)" if ckpt.distillation
                else "drop --distillation-type")
        state = "has" if ckpt.distillation else "has no"
        raise UserError(f"{ckpt.path} {state} a distillation head (head_dist): {hint}")
    if utils.guess_architecture(ckpt.state_dict) != utils.guess_architecture(model.state_dict()):
        return
    if ckpt.feature_dim is not None and ckpt.feature_dim != model.head_hidden_size:
        raise UserError(f"{ckpt.path} has feature_dim {ckpt.feature_dim}, the model {model.head_hidden_size}: "
                        f"pass --feature-dim {ckpt.feature_dim}")
    if ckpt.num_classes is not None and ckpt.num_classes != model.num_classes:
        raise UserError(f"{ckpt.path} has {ckpt.num_classes} classes, the dataset {model.num_classes}: use the "
                        "dataset it was trained on, or --finetune-from to train new heads")


def _export_class_mapping(output_dir: Path, class_names: Sequence[str], resuming: bool) -> None:
    path = output_dir / CLASS_MAPPING_FILE
    if path.is_file():
        differences = compare_class_mappings(read_class_mapping(path), class_names, expected_label=str(path),
                                             actual_label="dataset")
        if differences and resuming:
            raise UserError(f"{path} differs from the dataset's classes ({'; '.join(differences)}): resuming onto "
                            "other classes would corrupt the classifier; use the original dataset, or start a new "
                            "run in another --output-dir (--finetune-from the checkpoint)")
        if differences:
            print(f"warning: {path} differs from the dataset and is replaced: " + "; ".join(differences), flush=True)
    write_class_mapping(path, class_names)


def _build_loaders(args: argparse.Namespace, dataset_train: Dataset | None, dataset_val: Dataset,
                   device: torch.device) -> tuple[DataLoader | None, DataLoader, torch.Generator]:
    """Loaders whose order depends only on (seed, epoch, rank): samplers seeded by seed + epoch, and a generator
    (re-seeded every epoch) for the worker seeds, so a resumed run sees the same data as an uninterrupted one."""
    pin = args.pin_mem and device.type == "cuda"
    generator = torch.Generator()
    loader_train = None
    if dataset_train is not None:
        if args.repeated_aug:
            sampler = RASampler(dataset_train, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
        else:
            sampler = DistributedSampler(dataset_train, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                         seed=args.seed)
        loader_train = DataLoader(dataset_train, batch_size=args.batch_size, sampler=sampler,
                                  num_workers=args.num_workers, pin_memory=pin, drop_last=True, generator=generator)
        if len(loader_train) == 0:
            raise UserError(f"{len(sampler)} training images per process are fewer than --batch-size "
                            f"{args.batch_size}; lower --batch-size (or use fewer processes)")
    if args.distributed and args.dist_eval:
        if len(dataset_val) % args.world_size:
            utils.print_main(f"note: {len(dataset_val)} validation images do not split evenly over "
                             f"{args.world_size} processes: a few are counted twice (drop --dist-eval for exact "
                             "numbers)")
        val_sampler = DistributedSampler(dataset_val, num_replicas=args.world_size, rank=args.rank, shuffle=False)
    else:
        val_sampler = SequentialSampler(dataset_val)
    # Own generator: validation does not draw from the global RNG, so --eval-every leaves training unchanged.
    loader_val = DataLoader(dataset_val, batch_size=int(1.5 * args.batch_size), sampler=val_sampler,
                            num_workers=args.num_workers, pin_memory=pin, drop_last=False,
                            generator=torch.Generator().manual_seed(args.seed))
    return loader_train, loader_val, generator


def memory_format_of(args: argparse.Namespace) -> torch.memory_format:
    """``--channels-last``: the memory format of the model's weights and input batches."""
    return torch.channels_last if args.channels_last else torch.preserve_format


def _evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, loader_val: DataLoader, device: torch.device,
                         class_names: Sequence[str], criterion: nn.Module, metric_factory: Callable[[], Metric],
                         amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """``--eval``: validation metrics of the checkpoint's model weights (and of its EMA weights, if stored)."""
    path = Path(args.resume)
    raw = utils.load_checkpoint_file(path)
    _check_classes(_checkpoint_classes(raw, path), class_names, str(path), "evaluate on the dataset it was trained on")
    results = {}
    sources = [("model", False)] + ([("model_ema", True)] if isinstance(raw.get("model_ema"), dict) else [])
    for name, prefer_ema in sources:
        net = model if name == "model" else copy.deepcopy(model)
        ckpt = utils.checkpoint_from_dict(raw, path, prefer_ema=prefer_ema)
        _check_fits(ckpt, net)
        utils.load_checkpoint(ckpt, net, log=utils.print_main)
        stats = evaluate(net.to(device), loader_val, device, criterion, metric_factory(), amp_dtype=amp_dtype,
                         distributed=args.distributed and args.dist_eval, print_freq=args.print_freq,
                         memory_format=memory_format_of(args))
        utils.print_main(f"{path} ({name} weights): {json.dumps(stats)}")
        results[name] = stats
    return results


def fit(
    args: argparse.Namespace,
    model: nn.Module,
    dataset_train: Dataset | None,
    dataset_val: Dataset,
    class_names: Sequence[str],
    *,
    device: torch.device,
    criterion: nn.Module,
    mixup_fn: Callable | None = None,
    eval_criterion: nn.Module | None = None,
    metric_factory: Callable[[], Metric] = TopKAccuracy,
    best_key: str = "acc1",
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or with ``--eval`` only evaluate) ``model`` as the shared flags say, writing the run's output folder.

    Args:
        criterion: training loss (see :func:`train_one_epoch`); ``eval_criterion``: validation loss (default CE).
        metric_factory: a fresh :class:`Metric` per validation; ``best_key``: its value (higher is better) that
            selects ``model_best.pth``.
        extra_config: additional ``config.json`` entries.

    Returns:
        ``--eval``: the metrics per weight set; otherwise the last epoch's log record plus the best result.
    """
    main_process = utils.is_main_process()
    output_dir = Path(args.output_dir) if args.output_dir else None
    eval_criterion = eval_criterion if eval_criterion is not None else nn.CrossEntropyLoss()
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    loader_train, loader_val, generator = _build_loaders(args, None if args.eval else dataset_train, dataset_val,
                                                         device)
    memory_format = memory_format_of(args)
    model.to(device, memory_format=memory_format)
    criterion.to(device)
    if args.eval:
        return _evaluate_checkpoint(args, model, loader_val, device, class_names, eval_criterion, metric_factory,
                                    amp_dtype)

    raw = _load_resume_weights(args, model, class_names) if args.resume else None
    effective_batch = args.batch_size * args.world_size * args.accumulation_steps
    args.scaled_lr = args.lr * effective_batch / 512
    utils.print_main(f"learning rate {args.lr:g} x effective batch {effective_batch} ({args.batch_size} x "
                     f"{args.world_size} processes x {args.accumulation_steps} accumulation steps) / 512 = "
                     f"{args.scaled_lr:.4g}")
    config = {**model_config(args, model), **(extra_config or {})}
    if main_process and output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".*.pth.*.tmp"):  # left by a process killed while saving
            stale.unlink()
        _export_class_mapping(output_dir, class_names, resuming=raw is not None)
        if raw is None and (output_dir / CHECKPOINT_FILE).is_file():
            print(f"warning: {output_dir} holds a previous run, which this run overwrites (pass --resume "
                  f"{output_dir / CHECKPOINT_FILE} to continue it instead)", flush=True)
            (output_dir / LOG_FILE).unlink(missing_ok=True)
        _write_json(output_dir / ARGS_FILE, _plain_args(args))
        _write_json(output_dir / CONFIG_FILE, config)

    model_without_ddp = model
    sched_args = scheduler_kwargs(args)
    cooldown = args.cooldown_epochs if args.cooldown_epochs < args.epochs else 0
    sched_args.update(num_epochs=args.epochs - cooldown, cooldown_epochs=0, noise_seed=args.seed)
    try:
        optimizer = create_optimizer_v2(model_without_ddp, **{**optimizer_kwargs(args), "lr": args.scaled_lr})
        lr_scheduler, _ = create_scheduler_v2(optimizer, **sched_args)
    except ValueError as err:  # unknown --opt / --sched names
        raise UserError(f"{err}; use a timm optimizer (--opt adamw, sgd, lamb...) and scheduler (--sched cosine, "
                        "step, plateau...)") from None
    loss_scaler = NativeScaler(device="cuda") if args.amp and device.type == "cuda" else None
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    ema_evaluated = model_ema is not None and not (args.model_ema_force_cpu and device.type != "cpu")

    start_epoch = args.start_epoch
    best = {"metric": -math.inf, "source": None, "epoch": None}
    if raw is not None:
        _restore_training_state(args, raw, optimizer, lr_scheduler, loss_scaler, model_ema)
        start_epoch = int(raw["epoch"]) + 1
        best = {"metric": raw.get("best_metric", -math.inf), "source": raw.get("best_source"),
                "epoch": raw.get("best_epoch")}
        utils.print_main(f"resumed from {args.resume}: continuing at epoch {start_epoch + 1}")
    if start_epoch >= args.epochs:
        utils.print_main(f"{start_epoch} of {args.epochs} epochs are done; raise --epochs to train longer")
        return {"best": best}
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)

    if args.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    # Random streams: restored from the checkpoint, else seeded per process (augmentations differ between them).
    rng_states = raw.get("rng_states") if raw is not None else None
    if rng_states and len(rng_states) == args.world_size:
        utils.set_rng_state(rng_states[args.rank])
    else:
        if raw is not None:
            reason = (f"comes from {len(rng_states)} processes, this run has {args.world_size}" if rng_states
                      else "stores no random-number state")
            utils.print_main(f"note: the checkpoint {reason}: random streams are re-seeded (results differ from an "
                             "uninterrupted run)")
        utils.seed_everything(_epoch_seed(args.seed, start_epoch, args.rank))

    writer = None
    if main_process and output_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
    utils.print_main(f"training {args.model} on {len(dataset_train)} images, {len(class_names)} classes, "
                     f"epochs {start_epoch + 1}..{args.epochs}, {len(loader_train)} steps per epoch")
    record: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            started = time.time()
            loader_train.sampler.set_epoch(epoch)
            generator.manual_seed(_epoch_seed(args.seed, epoch, args.rank, stream=1))
            train_stats = train_one_epoch(
                model, criterion, loader_train, optimizer, device, epoch, loss_scaler=loss_scaler,
                amp_dtype=amp_dtype, accumulation_steps=args.accumulation_steps, clip_grad=args.clip_grad or None,
                clip_mode=args.clip_mode, model_ema=model_ema, mixup_fn=mixup_fn, print_freq=args.print_freq,
                header=f"Epoch {epoch + 1}/{args.epochs}", memory_format=memory_format,
            )
            done = epoch + 1
            record = {"epoch": done, "lr": train_stats["lr"], "train_loss": train_stats["loss"]}
            improved = None
            if done % args.eval_every == 0 or done == args.epochs:
                results = {"model": evaluate(model, loader_val, device, eval_criterion, metric_factory(),
                                             amp_dtype=amp_dtype, distributed=args.distributed and args.dist_eval,
                                             print_freq=args.print_freq, memory_format=memory_format)}
                if ema_evaluated:
                    results["model_ema"] = evaluate(model_ema.module, loader_val, device, eval_criterion,
                                                    metric_factory(), amp_dtype=amp_dtype,
                                                    distributed=args.distributed and args.dist_eval,
                                                    print_freq=args.print_freq, header="Val (EMA)",
                                                    memory_format=memory_format)
                for source, stats in results.items():
                    prefix = "val_" if source == "model" else "ema_val_"
                    record.update({prefix + key: value for key, value in stats.items()})
                    if stats[best_key] > best["metric"]:
                        best = {"metric": stats[best_key], "source": source, "epoch": done}
                        improved = source
                lr_scheduler.step(done, results["model"][best_key])
            else:
                lr_scheduler.step(done)
            _check_finite_weights(model_without_ddp, done)
            rng_states = utils.all_gather_objects(utils.get_rng_state())
            record["time"] = time.time() - started
            if main_process and output_dir:
                state = {
                    "model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
                    "epoch": epoch, "best_metric": best["metric"], "best_key": best_key,
                    "best_source": best["source"], "best_epoch": best["epoch"], "args": _plain_args(args),
                    "class_names": list(class_names), "config": config, "rng_states": rng_states,
                }
                if model_ema is not None:
                    state["model_ema"] = model_ema.module.state_dict()
                _save_epoch(output_dir, state, record, improved, args.save_every, writer)
            utils.print_main(_epoch_summary(record, args.epochs, best, best_key))
    finally:
        if writer is not None:
            writer.close()
    return {**record, "best": best}


def _load_resume_weights(args: argparse.Namespace, model: nn.Module, class_names: Sequence[str]) -> dict[str, Any]:
    """Read the ``--resume`` checkpoint, check it fits the dataset and the model, load its model weights."""
    path = Path(args.resume)
    raw = utils.load_checkpoint_file(path)
    missing = [key for key in ("optimizer", "epoch") if key not in raw]
    if missing:
        raise UserError(f"{path} holds no training state ({', '.join(missing)} missing), so it cannot be resumed; "
                        f"start a new run from its weights with --finetune-from {path}")
    _check_classes(_checkpoint_classes(raw, path), class_names, str(path), "resume with the dataset it was trained on")
    ckpt = utils.checkpoint_from_dict(raw, path)
    _check_fits(ckpt, model)
    utils.load_checkpoint(ckpt, model, log=utils.print_main)
    return raw


def _restore_training_state(args: argparse.Namespace, raw: dict[str, Any], optimizer: torch.optim.Optimizer,
                            lr_scheduler: Any, loss_scaler: NativeScaler | None, model_ema: ModelEmaV3 | None) -> None:
    """Optimizer, scheduler (unless the flags defining the schedule changed), AMP scaler and EMA of a checkpoint."""
    path = Path(args.resume)
    try:
        optimizer.load_state_dict(raw["optimizer"])
    except (ValueError, KeyError) as err:
        raise UserError(f"the optimizer state in {path} does not fit this run ({err}); resume with the checkpoint's "
                        "--opt and --weight-decay") from None
    saved_args = utils.checkpoint_from_dict(raw, path).args
    changed = [name for name in SCHEDULE_ARGS if name in saved_args and saved_args[name] != getattr(args, name)]
    if changed:
        flags = ", ".join("the learning rate (--lr x effective batch / 512)" if name == "scaled_lr"
                          else "--" + name.replace("_", "-") for name in changed)
        utils.print_main(f"note: {flags} changed since the checkpoint: the learning-rate schedule follows the "
                         "current flags")
    elif raw.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(raw["lr_scheduler"])
    if loss_scaler is not None and raw.get("scaler"):
        loss_scaler.load_state_dict(raw["scaler"])
    if model_ema is not None and isinstance(raw.get("model_ema"), dict):
        utils.load_checkpoint(utils.checkpoint_from_dict(raw, path, prefer_ema=True), model_ema.module,
                              log=utils.print_main)


def _save_epoch(output_dir: Path, state: dict[str, Any], record: dict[str, Any], improved: str | None,
                save_every: int, writer: Any) -> None:
    """Write the epoch's checkpoints (``model_best.pth`` first, ``checkpoint.pth`` last), log line and scalars."""
    done = record["epoch"]
    if improved:
        keys = ("epoch", "best_metric", "best_key", "args", "class_names", "config")
        best = {"model": state[improved], **{key: state[key] for key in keys}, "best_source": improved}
        utils.save_checkpoint_atomic(best, output_dir / BEST_FILE)
    if save_every and done % save_every == 0:
        utils.save_checkpoint_atomic(state, output_dir / f"checkpoint_epoch{done}.pth")
    utils.save_checkpoint_atomic(state, output_dir / CHECKPOINT_FILE)
    with open(output_dir / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    for key, value in record.items():
        if key not in ("epoch", "time"):
            writer.add_scalar(_tensorboard_tag(key), value, done)
    writer.flush()


def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise UserError(f"weights became non-finite in epoch {epoch} ({', '.join(bad[:3])}): training stopped and "
                        "this epoch was not saved; lower --lr or use --clip-grad")


def _tensorboard_tag(key: str) -> str:
    """``val_acc1`` -> ``val/acc1``, ``ema_val_loss`` -> ``ema_val/loss``, ``train_loss``/``lr`` -> ``train/...``."""
    for prefix in ("ema_val_", "val_", "train_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def _epoch_summary(record: dict[str, Any], epochs: int, best: dict[str, Any], best_key: str) -> str:
    parts = [f"train loss {record['train_loss']:.4f}", f"lr {record['lr']:.3e}"]
    for prefix, label in (("val_", "val"), ("ema_val_", "EMA val")):
        values = [f"{key[len(prefix):]} {value if isinstance(value, int) else format(value, '.4f')}"
                  for key, value in record.items() if key.startswith(prefix)]
        if values:
            parts.append(f"{label} " + " ".join(values))
    if best["source"]:
        parts.append(f"best {best_key} {best['metric']:.4f} ({best['source']}, epoch {best['epoch']})")
    return f"Epoch {record['epoch']}/{epochs}: " + ", ".join(parts) + f" [{record['time']:.1f}s]"
