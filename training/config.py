"""The training configuration: typed, frozen objects built once from the parsed flags by :meth:`TrainConfig.from_args`.

Model-dependent defaults (``--input-size`` from the model, ``--amp`` on for CUDA) and the ``--resume`` path (a folder
becomes the checkpoint inside it) are resolved while building; nothing changes the configuration afterwards.
"""

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from timm.models import get_pretrained_cfg

import utils
from artifacts.checkpoint import MODEL_FOLDER_FILES, find_checkpoint
from artifacts.run_folder import find_resume_checkpoint
from data.datasets import TransformConfig
from model.lsnet_artist import ARTIST_MODELS
from training.flags import EXPLICIT, FLAG_RANGES
from utils import UserError

__all__ = ["AugmentConfig", "DistillConfig", "EmaConfig", "LossConfig", "ModelConfig", "MultiLabelConfig",
           "OptimConfig", "RunConfig", "SamplerConfig", "TrainConfig"]

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``--model``, its input size and feature head, and how it is initialised."""

    name: str
    input_size: int
    feature_dim: int | None = None
    use_projection: bool = True
    num_classes: int | None = None  # as asked for; the dataset decides (see training.factory.resolve_num_classes)
    drop_path: float = 0.0
    pretrained: str | None = None  # a local .pth of the official weights, or training.flags.HUB_WEIGHTS
    finetune_from: str | None = None
    finetune: bool = False  # evaluate with a plain resize (squash) instead of resize + center crop


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule; field names are timm's (``optimizer_kwargs`` / ``scheduler_kwargs``)."""

    batch_size: int = 256
    epochs: int = 300
    accumulation_steps: int = 1
    opt: str = "adamw"
    opt_eps: float | None = 1e-8
    opt_betas: tuple[float, ...] | None = None
    momentum: float = 0.9
    weight_decay: float = 0.025
    clip_grad: float | None = 0.02
    clip_mode: str = "agc"
    sched: str = "cosine"
    lr: float = 1e-3
    lr_abs: float | None = None  # the used LR as given (wins over lr, which is for a batch of 512)
    layer_decay: float | None = None
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    cooldown_epochs: int = 10
    decay_epochs: float = 30
    decay_rate: float = 0.1
    lr_noise: tuple[float, ...] | None = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, mixup / cutmix and label smoothing."""

    color_jitter: float = 0.4
    crop_scale: float = 0.08
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    repeated_aug: bool = True
    three_augment: bool = False
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    resplit: bool = False
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"


@dataclass(frozen=True)
class EmaConfig:
    """Model EMA: on/off, decay, and whether it lives on the CPU (then it is not evaluated)."""

    enabled: bool = True
    decay: float = 0.99996
    force_cpu: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Where the data and outputs are, the device, seeding, resume / eval, saving, loading and speed switches."""

    data_path: str
    output_dir: str | None = "output"
    device: str | None = None
    seed: int = 0
    resume: str | None = None  # the checkpoint file (a folder is resolved to the checkpoint in it)
    start_epoch: int = 0
    eval_only: bool = False
    save_every: int = 0
    eval_every: int = 1
    patience: int = 0
    num_workers: int = 10
    pin_mem: bool = True
    amp: bool = False
    dist_eval: bool = False
    compile: bool = False
    channels_last: bool = False
    print_freq: int = 50


@dataclass(frozen=True)
class DistillConfig:
    """DeiT-style distillation: ``type`` none / soft / hard, the teacher, and the loss mix."""

    type: str = "none"
    teacher_model: str | None = None
    teacher_path: str | None = None
    alpha: float = 0.5
    tau: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.type != "none"


@dataclass(frozen=True)
class MultiLabelConfig:
    """Multi-label training: annotation CSVs, the label separator, the decision threshold and the loss weight clip."""

    train_ann: str
    val_ann: str
    label_delimiter: str = ","
    threshold: float = 0.4
    max_pos_weight: float = 10.0
    allow_outside_root: bool = False


@dataclass(frozen=True)
class LossConfig:
    """``--loss`` and its settings: ArcFace scale / margin / sub-centres, the supcon temperature."""

    name: str = "ce"
    scale: float = 30.0
    margin: float = 0.3
    subcenters: int = 3
    temperature: float = 0.1

    @property
    def metric(self) -> bool:
        """A metric loss on the style vectors (not the classifier's cross-entropy)."""
        return self.name != "ce"


@dataclass(frozen=True)
class SamplerConfig:
    """``--sampler`` random (shuffled, with ``--repeated-aug``) or class-balanced groups of ``samples_per_class``;
    ``epoch_repeats`` passes of it per epoch."""

    name: str = "random"
    samples_per_class: int = 4
    epoch_repeats: int = 1


# Config field -> flag (namespace attribute) where the names differ.
_RENAMES: dict[type, dict[str, str]] = {
    ModelConfig: {"name": "model"},
    AugmentConfig: {"auto_augment": "aa", "three_augment": "ThreeAugment"},
    EmaConfig: {"enabled": "model_ema", "decay": "model_ema_decay", "force_cpu": "model_ema_force_cpu"},
    RunConfig: {"eval_only": "eval"},
    DistillConfig: {"type": "distillation_type", "alpha": "distillation_alpha", "tau": "distillation_tau"},
    LossConfig: {"name": "loss", "scale": "loss_scale", "margin": "loss_margin"},
    SamplerConfig: {"name": "sampler"},
}


def _section(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls`` from the flag values it has a field for (lists become tuples, so the object stays hashable)."""
    renames = _RENAMES.get(cls, {})
    kwargs = {}
    for item in dataclasses.fields(cls):
        flag = renames.get(item.name, item.name)
        if flag in values:
            value = values[flag]
            kwargs[item.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is configured with, grouped by concern; built once by :meth:`from_args`."""

    model: ModelConfig
    optim: OptimConfig
    augment: AugmentConfig
    ema: EmaConfig
    run: RunConfig
    distill: DistillConfig = DistillConfig()
    multilabel: MultiLabelConfig | None = None
    loss: LossConfig = LossConfig()
    sampler: SamplerConfig = SamplerConfig()
    flags: Mapping[str, Any] = field(default_factory=dict, repr=False)  # every flag's resolved value, by name
    explicit: frozenset[str] = frozenset()  # the flags the user gave (command line or --config file)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """Check the parsed flags and build the configuration, resolving model- and device-dependent defaults."""
        values = {key: value for key, value in vars(args).items() if key != EXPLICIT}
        _check_flags(values)
        if values["resume"]:  # fail before the dataset scan; a folder resolves to the checkpoint file in it
            values["resume"] = _resolve_resume(values["resume"], values["eval"])
        device = utils.resolve_device(values["device"])
        if values["input_size"] is None:
            values["input_size"] = int(get_pretrained_cfg(values["model"]).input_size[-1])
        if values["amp"] is None:
            values["amp"] = device.type == "cuda"
        return cls(
            model=_section(ModelConfig, values), optim=_section(OptimConfig, values),
            augment=_section(AugmentConfig, values), ema=_section(EmaConfig, values), run=_section(RunConfig, values),
            distill=_section(DistillConfig, values),
            multilabel=_section(MultiLabelConfig, values) if "train_ann" in values else None,
            loss=_section(LossConfig, values), sampler=_section(SamplerConfig, values),
            flags=MappingProxyType(values), explicit=frozenset(getattr(args, EXPLICIT, ())),
        )

    @property
    def transform(self) -> TransformConfig:
        """The settings of the training and evaluation transforms."""
        aug = self.augment
        return TransformConfig(
            input_size=self.model.input_size, color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
            interpolation=aug.train_interpolation, reprob=aug.reprob, remode=aug.remode, recount=aug.recount,
            three_augment=aug.three_augment, squash=self.model.finetune, crop_scale=aug.crop_scale,
        )


def _resolve_resume(path: str, eval_only: bool) -> str:
    """``--resume``: a file as given; a folder: its best weights (``--eval``) or its newest loadable training
    checkpoint (said when it is not ``checkpoint.pth``)."""
    if eval_only or not Path(path).is_dir():
        return str(find_checkpoint(path, MODEL_FOLDER_FILES if eval_only else ()))
    found, passed_over = find_resume_checkpoint(path)
    utils.print_main(f"--resume {path}: continuing from {found}" + (f" ({passed_over})" if passed_over else ""))
    return str(found)


def _check_flags(values: Mapping[str, Any]) -> None:
    """One clear error for the first flag that cannot work (before any data are read)."""
    if "train_ann" in values:
        _check_multilabel_flags(values)
    if values["model"] not in ARTIST_MODELS:
        raise UserError(f"unknown --model {values['model']!r}; use one of {', '.join(ARTIST_MODELS)}")
    if not values["data_path"]:
        raise UserError("--data-path is required: the folder with train/ and val/ made by prepare_dataset.py")
    _check_ranges(values)
    if values["pretrained"] and values["finetune_from"]:
        raise UserError("--pretrained and --finetune-from both initialise the weights; pass only one")
    if values["eval"] and not values["resume"]:
        raise UserError("--eval needs --resume PATH: the checkpoint (or model folder) to evaluate")
    if "loss" in values:
        _check_embedding_flags(values)


def _check_embedding_flags(values: Mapping[str, Any]) -> None:
    """A metric ``--loss`` does not combine with distillation (its numbers are checked with :data:`FLAG_RANGES`)."""
    if values["loss"] != "ce" and values["distillation_type"] != "none":
        raise UserError(f"--loss {values['loss']} trains the style vectors without a teacher: drop "
                        "--distillation-type (distillation works with --loss ce)")


def _check_ranges(values: Mapping[str, Any]) -> None:
    """Every numeric setting within its :data:`~training.flags.FLAG_RANGES` (also the values of a --config file)."""
    for name, allowed in FLAG_RANGES.items():
        value = values.get(name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            problem = None if item is None else allowed.problem(item)
            if problem:
                raise UserError(f"--{name.replace('_', '-')} {problem}")


def _check_multilabel_flags(values: Mapping[str, Any]) -> None:
    if not values["data_path"]:
        raise UserError("--data-path is required: the folder the image paths of the CSVs start from (. for the "
                        "current folder)")
