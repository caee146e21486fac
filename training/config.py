"""The training settings, each declared once (:func:`training.settings.setting`), and the typed, frozen
:class:`TrainConfig` built from them by :meth:`TrainConfig.from_args`.

A field's declaration is its flag, ``--config`` key, default, help and allowed range. Model-dependent defaults
(``--input-size`` from the model, ``--amp`` on for CUDA) and the ``--eval --resume`` path (a folder becomes the
weights inside it) are resolved while building; the checkpoint to continue is read once, by
:func:`training.resume.open_resume`; the recipe's changes come through :meth:`TrainConfig.with_settings`.
"""

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import get_pretrained_cfg

import utils
from artifacts.model_source import MODEL_FOLDER_FILES, find_checkpoint
from data.datasets import TransformConfig
from data.scan import usable_cpus
from losses import DISTILLATION_TYPES, LOSSES
from model.lsnet_artist import ARTIST_MODELS
from training.settings import (
    EXPLICIT,
    build_section,
    check_section,
    declarations,
    optional_str,
    section_values,
    setting,
)
from utils import NumberRange, UserError

__all__ = ["DEIT_BATCH", "HUB_WEIGHTS", "RECIPES", "SECTIONS", "AugmentConfig", "DistillConfig", "EmaConfig",
           "LossConfig", "ModelConfig", "MultiLabelConfig", "OptimConfig", "RunConfig", "SamplerConfig", "TrainConfig",
           "resolve_amp"]

HUB_WEIGHTS = "hub"  # ``--pretrained`` without a path: the official weights through the Hugging Face Hub (cache)
RECIPES = ("auto", "imagenet", "finetune")
DEIT_BATCH = 256  # DeiT's batch per process: the largest the recipe chooses, and --eval's when none is given
_COUNT, _SIZE, _SHARE = NumberRange(int, 0), NumberRange(int, 1), NumberRange(float, 0, 1)
_POSITIVE, _NON_NEGATIVE = NumberRange(float, 0, low_open=True), NumberRange(float, 0)
_BELOW_ONE = NumberRange(float, 0, 1, high_open=True)


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``--model``, its input size and feature head, and how it is initialised."""

    name: str = setting("lsnet_t_artist", f"one of {', '.join(ARTIST_MODELS)}", name="model", metavar="NAME")
    input_size: int | None = setting(None, "training / evaluation image size (default: the model's, 224; 448 for "
                                           "*_448; the recipe may choose the images' own size)", allowed=_SIZE)
    feature_dim: int | None = setting(None, "size of the style feature vector (default: the backbone's last embed "
                                            "dim)", allowed=_SIZE)
    use_projection: bool = setting(True, "project the pooled feature to --feature-dim (off: --feature-dim must "
                                         "equal the backbone dim)", aliases=("--projection",))
    num_classes: int | None = setting(None, "default: the number of classes of the dataset", allowed=_SIZE)
    drop_path: float = setting(0.0, "stochastic depth rate", allowed=_BELOW_ONE)
    pretrained: str | None = setting(
        None, "initialise the backbone from the official LSNet ImageNet weights of the model's size (heads and "
              "projection are new): alone, through the Hugging Face Hub cache; with PATH (or --pretrained-path "
              "PATH), from that local .pth", aliases=("--pretrained-path",), nargs="?", const=HUB_WEIGHTS,
        metavar="PATH")
    finetune_from: str | None = setting(None, "initialise from a model checkpoint (weights only; heads reset if the "
                                              "classes differ)", metavar="PATH")
    finetune: bool = setting(False, "evaluate with a plain resize to --input-size instead of resize + center crop")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule; field names are timm's (``optimizer_kwargs`` / ``scheduler_kwargs``)."""

    batch_size: int | None = setting(None, "per process (default: the recipe's, from the data: the largest power "
                                           "of two leaving 3+ batches per epoch, 8..256)", allowed=_SIZE)
    epochs: int = setting(300, allowed=_SIZE)
    accumulation_steps: int = setting(1, "micro-batches per optimizer step (effective batch = batch x processes x "
                                         "this)", allowed=_SIZE)
    opt: str = setting("adamw", "timm optimizer name")
    opt_eps: float | None = setting(1e-8, allowed=_NON_NEGATIVE)
    opt_betas: tuple[float, ...] | None = setting(None, allowed=_BELOW_ONE)
    momentum: float = setting(0.9, allowed=_SHARE)
    weight_decay: float = setting(0.025, allowed=_NON_NEGATIVE)
    clip_grad: float | None = setting(0.02, "clipping value / norm / AGC factor (0: off)", allowed=_NON_NEGATIVE)
    clip_mode: str = setting("agc", choices=("norm", "value", "agc"))
    sched: str = setting("cosine", "timm scheduler name (stepped per optimizer step; plateau per epoch)")
    recipe: str = setting("auto", "settings chosen from the data and the run (auto), the DeiT ImageNet defaults "
                                  "(imagenet) or fine-tuning ones (finetune; auto picks it with --pretrained / "
                                  "--finetune-from); flags you give always win", choices=RECIPES)
    lr: float = setting(1e-3, "learning rate for an effective batch of 512 (scaled linearly to the actual one)",
                        allowed=_POSITIVE)
    lr_abs: float | None = setting(None, "the learning rate used as given (no scaling); wins over --lr",
                                   allowed=_NON_NEGATIVE)
    layer_decay: float | None = setting(None, "layer-wise LR decay (e.g. 0.75: each earlier block learns 0.75x "
                                              "slower; fine-tuning)", allowed=NumberRange(float, 0, 1, low_open=True))
    min_lr: float = setting(1e-5, allowed=_NON_NEGATIVE)
    warmup_lr: float = setting(1e-6, allowed=_NON_NEGATIVE)
    warmup_epochs: int = setting(5, allowed=_COUNT)
    cooldown_epochs: int = setting(10, "last epochs of --epochs held at --min-lr (ignored unless smaller than "
                                       "--epochs)", allowed=_COUNT)
    decay_epochs: float = setting(30, "step schedule: epochs between decays", allowed=_POSITIVE)
    decay_rate: float = setting(0.1, aliases=("--dr",), allowed=_NON_NEGATIVE)
    lr_noise: tuple[float, ...] | None = setting(None, "noise on/off epochs as fractions", allowed=_NON_NEGATIVE)
    lr_noise_pct: float = setting(0.67, allowed=_SHARE)
    lr_noise_std: float = setting(1.0, allowed=_NON_NEGATIVE)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, mixup / cutmix and label smoothing."""

    color_jitter: float = setting(0.4, allowed=_NON_NEGATIVE)
    crop_scale: float = setting(0.08, "smallest share of the image area a training crop keeps (random resized crop "
                                      "up to the whole image); small crops, upscaled, change the size of strokes, "
                                      "dots and spacing", allowed=NumberRange(float, 0, 1, low_open=True),
                                metavar="SHARE")
    auto_augment: str | None = setting("rand-m9-mstd0.5-inc1", "timm auto-augment; none: off", name="aa",
                                       type=optional_str)
    smoothing: float = setting(0.1, "label smoothing", allowed=_BELOW_ONE)
    train_interpolation: str = setting("bicubic")
    repeated_aug: bool = setting(True, "repeated augmentation (3 views per image and epoch, on different processes)")
    three_augment: bool = setting(False, "DeiT III augmentation instead of RandAugment", name="ThreeAugment")
    reprob: float = setting(0.25, "random erasing probability", allowed=_SHARE)
    remode: str = setting("pixel")
    recount: int = setting(1, allowed=_SIZE)
    resplit: bool = setting(False, "no random erasing of the first augmentation split")
    mixup: float = setting(0.8, "mixup alpha (0: off)", allowed=_NON_NEGATIVE)
    cutmix: float = setting(1.0, "cutmix alpha (0: off)", allowed=_NON_NEGATIVE)
    cutmix_minmax: tuple[float, float] | None = setting(None, allowed=_SHARE)
    mixup_prob: float = setting(1.0, allowed=_SHARE)
    mixup_switch_prob: float = setting(0.5, allowed=_SHARE)
    mixup_mode: str = setting("batch", choices=("batch", "pair", "elem"))

    def transform(self, input_size: int, squash: bool = False) -> TransformConfig:
        """The settings of the training and evaluation transforms at ``input_size`` (``squash``: ``--finetune``)."""
        return TransformConfig(input_size=input_size, color_jitter=self.color_jitter, auto_augment=self.auto_augment,
                               interpolation=self.train_interpolation, reprob=self.reprob, remode=self.remode,
                               recount=self.recount, three_augment=self.three_augment, squash=squash,
                               crop_scale=self.crop_scale)


@dataclass(frozen=True)
class EmaConfig:
    """Model EMA: on/off, decay, and whether it lives on the CPU (then it is not evaluated)."""

    enabled: bool = setting(True, "exponential moving average of the weights", name="model_ema")
    decay: float = setting(0.99996, name="model_ema_decay", allowed=_SHARE)
    force_cpu: bool = setting(False, "keep the EMA on the CPU (not evaluated)", name="model_ema_force_cpu")


@dataclass(frozen=True)
class RunConfig:
    """Where the data and outputs are, the device, seeding, resume / eval, saving, loading and speed switches."""

    data_path: str | None = setting(None, "dataset folder with train/ and val/ (prepare_dataset.py); multi-label: "
                                          "the folder the image paths of the annotation CSVs start from")
    output_dir: str | None = setting("output", "where checkpoints and logs go", aliases=("--output_dir",))
    device: str | None = setting(None, "cuda, cuda:N or cpu (default: cuda when available)")
    seed: int = setting(0, allowed=_COUNT)
    resume: str | None = setting(None, "checkpoint.pth (or its folder) to continue", metavar="PATH")
    start_epoch: int = setting(0, "first epoch (resume sets it)", aliases=("--start_epoch",), allowed=_COUNT)
    eval_only: bool = setting(False, "only evaluate the --resume checkpoint on val/", name="eval")
    save_every: int = setting(0, "keep checkpoint_epochN.pth (0: off)", metavar="N", allowed=_COUNT)
    eval_every: int = setting(1, "validate every N epochs (and the last)", metavar="N", allowed=_SIZE)
    patience: int = setting(0, "stop when the validation metric has not improved for N validations (0: off)",
                            metavar="N", allowed=_COUNT)
    num_workers: int = setting(help="data loading processes (default: the CPU cores this process may use, at most "
                                    "10)", aliases=("--num_workers",), allowed=_COUNT,
                               factory=lambda: min(10, usable_cpus()))
    pin_mem: bool = setting(True, "pin CPU memory for faster GPU transfer")
    amp: bool | None = setting(None, "mixed precision: float16 + grad scaler on CUDA, bfloat16 on CPU (default: on "
                                     "for CUDA)")
    dist_eval: bool = setting(False, "split validation over the processes")
    compile: bool = setting(False, "torch.compile the model")
    channels_last: bool = setting(False, "channels-last memory format for the model and its inputs: faster "
                                         "convolutions on most CPUs and on GPUs with --amp")
    print_freq: int = setting(50, "steps between progress lines (when not a TTY)", allowed=_SIZE)


@dataclass(frozen=True)
class DistillConfig:
    """DeiT-style distillation: ``type`` none / soft / hard, the teacher, and the loss mix."""

    type: str = setting("none", name="distillation_type", choices=DISTILLATION_TYPES)
    teacher_model: str | None = setting(None, "teacher architecture, e.g. lsnet_b_distill or lsnet_b_artist",
                                        metavar="NAME")
    teacher_path: str | None = setting(None, "teacher checkpoint (same classes)", metavar="PATH")
    alpha: float = setting(0.5, name="distillation_alpha", allowed=_SHARE)
    tau: float = setting(1.0, name="distillation_tau", allowed=_POSITIVE)

    @property
    def enabled(self) -> bool:
        return self.type != "none"


@dataclass(frozen=True)
class MultiLabelConfig:
    """Multi-label training: annotation CSVs, the label separator, the decision threshold and the loss weight clip."""

    train_ann: str | None = setting(None, "training annotations (image_path,labels); its labels are the model's "
                                          "classes", required=True, metavar="CSV")
    val_ann: str | None = setting(None, "validation annotations", required=True, metavar="CSV")
    label_delimiter: str = setting(",", "separator of the labels inside the labels field")
    threshold: float = setting(0.4, "confidence at which a label counts as predicted (precision, recall, F1)",
                               allowed=NumberRange(float, 0, 1, low_open=True, high_open=True))
    max_pos_weight: float = setting(10.0, "upper clip of the per-label positive weight (negatives / positives) of "
                                          "the loss", allowed=NumberRange(float, 1))
    allow_outside_root: bool = setting(False, "use CSV rows whose image lies outside --data-path (otherwise they "
                                              "are left out)")


@dataclass(frozen=True)
class LossConfig:
    """``--loss`` and its settings: ArcFace scale / margin / sub-centres, the supcon temperature."""

    name: str = setting("ce", "ce: classifier cross-entropy; arcface / subcenter-arcface / supcon: a metric loss on "
                              "the L2-normalised style vectors (the head is then a probe on the detached vectors)",
                        name="loss", choices=LOSSES)
    scale: float = setting(30.0, "ArcFace scale s", name="loss_scale", allowed=_POSITIVE)
    margin: float = setting(0.3, "ArcFace additive angular margin (radians)", name="loss_margin",
                            allowed=NumberRange(float, 0, 1.5))
    subcenters: int = setting(3, "sub-centres per class of subcenter-arcface", allowed=_SIZE)
    temperature: float = setting(0.1, "supcon temperature", allowed=_POSITIVE)

    @property
    def metric(self) -> bool:
        """A metric loss on the style vectors (not the classifier's cross-entropy)."""
        return self.name != "ce"


@dataclass(frozen=True)
class SamplerConfig:
    """``--sampler`` random (shuffled, with ``--repeated-aug``) or class-balanced groups of ``samples_per_class``;
    ``epoch_repeats`` passes of it per epoch."""

    name: str = setting("random", "class-balanced: every artist equally often, in groups of --samples-per-class "
                                  "(replaces --repeated-aug)", name="sampler", choices=("random", "class-balanced"))
    samples_per_class: int = setting(4, "images per artist in each group of the class-balanced sampler",
                                     metavar="K", allowed=_SIZE)
    epoch_repeats: int = setting(1, "passes over the training images per epoch (small data: more steps per epoch)",
                                 metavar="N", allowed=_SIZE)


# The sections of a training configuration: TrainConfig attribute -> class (multi-label only with its flags).
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "optim": OptimConfig, "augment": AugmentConfig, "ema": EmaConfig, "run": RunConfig,
    "distill": DistillConfig, "multilabel": MultiLabelConfig, "loss": LossConfig, "sampler": SamplerConfig,
}


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
    explicit: frozenset[str] = frozenset()  # the settings the user gave (command line or --config file)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """Check the parsed flags and build the configuration, resolving model- and device-dependent defaults."""
        values = {key: value for key, value in vars(args).items() if key not in (EXPLICIT, "config")}
        _check_flags(values)
        if values["resume"] and values["eval"]:  # fail before the dataset scan (training: see training.resume)
            values["resume"] = str(find_checkpoint(values["resume"], MODEL_FOLDER_FILES))
        if values["eval"] and values["batch_size"] is None:  # no recipe runs for --eval
            values["batch_size"] = DEIT_BATCH
        device = utils.resolve_device(values["device"])
        if values["input_size"] is None:
            values["input_size"] = int(get_pretrained_cfg(values["model"]).input_size[-1])
        values["amp"] = resolve_amp(values["amp"], device)
        sections = {name: build_section(section, values) for name, section in SECTIONS.items()}
        if "train_ann" not in values:
            sections["multilabel"] = None
        return cls(**sections, explicit=frozenset(getattr(args, EXPLICIT, ())))

    def settings(self) -> dict[str, Any]:
        """Every setting's value by name: the record saved as ``args.json`` and in the checkpoints."""
        values: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if section is not None:
                values.update(section_values(section))
        return values

    def with_settings(self, changes: Mapping[str, Any]) -> "TrainConfig":
        """This configuration with some settings (by name) changed, range-checked like the flags."""
        replaced = {}
        for attr, section in SECTIONS.items():
            current = getattr(self, attr)
            mine = {name: value for name, value in changes.items() if name in _names(section)}
            if mine and current is not None:
                merged = {**section_values(current), **mine}
                check_section(section, merged)
                replaced[attr] = build_section(section, merged)
        unknown = set(changes) - set().union(*(_names(section) for section in SECTIONS.values()))
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        return dataclasses.replace(self, **replaced)

    @property
    def transform(self) -> TransformConfig:
        """The settings of the training and evaluation transforms."""
        return self.augment.transform(self.model.input_size, squash=self.model.finetune)


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """``--amp`` as given, or (not given) on for CUDA."""
    return device.type == "cuda" if amp is None else amp


def _names(section: type) -> frozenset[str]:
    return frozenset(name for _, name, _ in declarations(section))


def _check_flags(values: Mapping[str, Any]) -> None:
    """One clear error for the first flag that cannot work (before any data are read)."""
    if values["model"] not in ARTIST_MODELS:
        raise UserError(f"unknown --model {values['model']!r}; use one of {', '.join(ARTIST_MODELS)}")
    if not values["data_path"]:
        hint = ("the folder the image paths of the CSVs start from (. for the current folder)" if "train_ann" in values
                else "the folder with train/ and val/ made by prepare_dataset.py")
        raise UserError(f"--data-path is required: {hint}")
    for section in SECTIONS.values():
        check_section(section, values)
    if values["pretrained"] and values["finetune_from"]:
        raise UserError("--pretrained and --finetune-from both initialise the weights; pass only one")
    if values["eval"] and not values["resume"]:
        raise UserError("--eval needs --resume PATH: the checkpoint (or model folder) to evaluate")
    if values.get("loss", "ce") != "ce" and values.get("distillation_type", "none") != "none":
        raise UserError(f"--loss {values['loss']} trains the style vectors without a teacher: drop "
                        "--distillation-type (distillation works with --loss ce)")
