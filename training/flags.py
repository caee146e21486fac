"""The command-line flags of the training scripts, defined once, and ``--config run.yaml`` (flags override it).

:class:`TrainArgumentParser` records which settings the user gave (on the command line or in the YAML file) in
``args.explicit_flags``, so later code can tell a chosen value from a default.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from data.scan import usable_cpus
from losses import DISTILLATION_TYPES, LOSSES
from model.lsnet_artist import ARTIST_MODELS
from utils import NumberRange

# ``--pretrained`` without a path: the official weights through the Hugging Face Hub (cache).
HUB_WEIGHTS = "hub"

__all__ = ["EXPLICIT", "FLAG_RANGES", "TrainArgumentParser", "add_common_args", "add_distillation_args",
           "add_embedding_args",            "add_multilabel_args"]

EXPLICIT = "explicit_flags"  # the namespace attribute holding the names of the settings the user gave
BOOL = argparse.BooleanOptionalAction
_COUNT, _SIZE, _SHARE = NumberRange(int, 0), NumberRange(int, 1), NumberRange(float, 0, 1)
_POSITIVE, _NON_NEGATIVE = NumberRange(float, 0, low_open=True), NumberRange(float, 0)
_BELOW_ONE = NumberRange(float, 0, 1, high_open=True)
# The allowed values of every numeric setting (flag or --config entry), checked before anything is read.
FLAG_RANGES: dict[str, NumberRange] = {
    "input_size": _SIZE, "feature_dim": _SIZE, "num_classes": _SIZE, "drop_path": _BELOW_ONE,
    "batch_size": _SIZE, "epochs": _SIZE, "accumulation_steps": _SIZE, "opt_eps": _NON_NEGATIVE,
    "opt_betas": _BELOW_ONE, "momentum": _SHARE, "weight_decay": _NON_NEGATIVE,
    "clip_grad": _NON_NEGATIVE, "lr": _POSITIVE, "min_lr": _NON_NEGATIVE, "warmup_lr": _NON_NEGATIVE,
    "warmup_epochs": _COUNT, "cooldown_epochs": _COUNT, "decay_epochs": _POSITIVE, "decay_rate": _NON_NEGATIVE,
    "lr_noise": _NON_NEGATIVE, "lr_noise_pct": _SHARE, "lr_noise_std": _NON_NEGATIVE,
    "color_jitter": _NON_NEGATIVE, "smoothing": _BELOW_ONE, "reprob": _SHARE, "epoch_repeats": _SIZE,
    "recount": _SIZE, "mixup": _NON_NEGATIVE, "cutmix": _NON_NEGATIVE, "cutmix_minmax": _SHARE, "mixup_prob": _SHARE,
    "mixup_switch_prob": _SHARE, "model_ema_decay": _SHARE, "seed": _COUNT, "start_epoch": _COUNT,
    "save_every": _COUNT, "eval_every": _SIZE, "num_workers": _COUNT, "print_freq": _SIZE,
    "distillation_alpha": _SHARE, "distillation_tau": _POSITIVE, "lr_abs": _NON_NEGATIVE,
    "layer_decay": NumberRange(float, 0, 1, low_open=True), "patience": _COUNT, "loss_scale": _POSITIVE,
    "loss_margin": NumberRange(float, 0, 1.5), "subcenters": _SIZE, "temperature": _POSITIVE,
    "samples_per_class": _SIZE,
    "crop_scale": NumberRange(float, 0, 1, low_open=True),
    "threshold": NumberRange(float, 0, 1, low_open=True, high_open=True), "max_pos_weight": NumberRange(float, 1),
}


def _optional_str(value: str) -> str | None:
    return None if value.lower() in ("", "none") else value


class TrainArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``--config FILE.yaml``: the file's values replace the defaults, flags win.

    The parsed namespace carries ``explicit_flags``: the names of the settings given on the command line or in
    the file.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--config", default=None, metavar="YAML",
                          help="YAML file of settings (flag names without --, - or _); command-line flags win")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        config_path = pre.parse_known_args(args)[0].config
        from_file = self._read_config(config_path) if config_path else {}
        saved = {action.dest: (action.default, action.required) for action in self._actions}
        try:
            for action in self._actions:  # the file's values are the defaults (they satisfy required flags)
                action.default = from_file.get(action.dest, saved[action.dest][0])
                action.required = saved[action.dest][1] and action.dest not in from_file
            parsed, extras = super().parse_known_args(args, namespace)
            for action in self._actions:  # what the command line sets: parsed again with no defaults at all
                action.default, action.required = argparse.SUPPRESS, False
            given = vars(super().parse_known_args(args, argparse.Namespace())[0])
        finally:
            for action in self._actions:
                action.default, action.required = saved[action.dest]
        setattr(parsed, EXPLICIT, frozenset(given) | frozenset(from_file))
        return parsed, extras

    def _read_config(self, path: str) -> dict[str, Any]:
        """The ``--config`` YAML file as ``{dest: value}``; an unreadable file or unknown key is a usage error."""
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            self.error(f"--config {path} is not a readable YAML file ({str(err).splitlines()[0]})")
        if not isinstance(values, dict):
            self.error(f"--config {path} must hold a mapping such as 'epochs: 100'")
        known = {action.dest for action in self._actions if action.dest not in ("help", "config")}
        values = {str(key).lstrip("-").replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            self.error(f"--config {path}: unknown settings {', '.join(unknown)}; use the flag names of --help")
        return values


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by the training scripts: model, optimisation, augmentation, EMA and run control."""
    _add_model_args(parser.add_argument_group("model"))
    _add_optimisation_args(parser.add_argument_group("optimisation"))
    _add_augmentation_args(parser.add_argument_group("augmentation"))
    group = parser.add_argument_group("model EMA")
    group.add_argument("--model-ema", action=BOOL, default=True, help="exponential moving average of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.99996)
    group.add_argument("--model-ema-force-cpu", action=BOOL, default=False,
                       help="keep the EMA on the CPU (not evaluated)")
    _add_run_args(parser.add_argument_group("run control"))
    return parser


def _add_model_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model", default="lsnet_t_artist", metavar="NAME", help=f"one of {', '.join(ARTIST_MODELS)}")
    group.add_argument("--input-size", type=int, default=None,
                       help="training / evaluation image size (default: the model's, 224; 448 for *_448)")
    group.add_argument("--feature-dim", type=int, default=None,
                       help="size of the style feature vector (default: the backbone's last embed dim)")
    group.add_argument("--use-projection", "--projection", dest="use_projection", action=BOOL, default=True,
                       help="project the pooled feature to --feature-dim (off: --feature-dim must equal the backbone "
                            "dim)")
    group.add_argument("--num-classes", type=int, default=None, help="default: the number of classes of the dataset")
    group.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    group.add_argument("--pretrained", nargs="?", const=HUB_WEIGHTS, default=None, metavar="PATH",
                       help="initialise the backbone from the official LSNet ImageNet weights of the model's size "
                            "(heads and projection are new): alone, through the Hugging Face Hub cache; with PATH, "
                            "from that local .pth")
    group.add_argument("--pretrained-path", dest="pretrained", default=None, metavar="FILE",
                       help="--pretrained from a local copy of the official weights (e.g. lsnet_t.pth)")
    group.add_argument("--finetune-from", default=None, metavar="PATH",
                       help="initialise from a model checkpoint (weights only; heads reset if the classes differ)")
    group.add_argument("--finetune", action="store_true",
                       help="evaluate with a plain resize to --input-size instead of resize + center crop")


def _add_optimisation_args(group: argparse._ArgumentGroup) -> None:
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
    group.add_argument("--recipe", default="auto", choices=("auto", "imagenet", "finetune"),
                       help="settings chosen from the data and the run (auto), the DeiT ImageNet defaults (imagenet) "
                            "or fine-tuning ones (finetune; auto picks it with --pretrained / --finetune-from); "
                            "flags you give always win")
    group.add_argument("--lr", type=float, default=1e-3,
                       help="learning rate for an effective batch of 512 (scaled linearly to the actual one)")
    group.add_argument("--lr-abs", type=float, default=None,
                       help="the learning rate used as given (no scaling); wins over --lr")
    group.add_argument("--layer-decay", type=float, default=None,
                       help="layer-wise LR decay (e.g. 0.75: each earlier block learns 0.75x slower; fine-tuning)")
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


def _add_augmentation_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--color-jitter", type=float, default=0.4)
    group.add_argument("--crop-scale", type=float, default=0.08, metavar="SHARE",
                       help="smallest share of the image area a training crop keeps (random resized crop up to the "
                            "whole image); small crops, upscaled, change the size of strokes, dots and spacing")
    group.add_argument("--aa", type=_optional_str, default="rand-m9-mstd0.5-inc1", help="timm auto-augment; none: off")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--train-interpolation", default="bicubic")
    group.add_argument("--repeated-aug", action=BOOL, default=True,
                       help="repeated augmentation (3 views per image and epoch, on different processes)")
    group.add_argument("--ThreeAugment", action=BOOL, default=False,
                       help="DeiT III augmentation instead of RandAugment")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--remode", default="pixel")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--resplit", action=BOOL, default=False,
                       help="no random erasing of the first augmentation split")
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))


def _add_run_args(group: argparse._ArgumentGroup) -> None:
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
    group.add_argument("--patience", type=int, default=0, metavar="N",
                       help="stop when the validation metric has not improved for N validations (0: off)")
    group.add_argument("--num-workers", "--num_workers", type=int, default=min(10, usable_cpus()),
                       help="data loading processes (default: the CPU cores this process may use, at most 10)")
    group.add_argument("--pin-mem", action=BOOL, default=True, help="pin CPU memory for faster GPU transfer")
    group.add_argument("--amp", action=BOOL, default=None,
                       help="mixed precision: float16 + grad scaler on CUDA, bfloat16 on CPU (default: on for CUDA)")
    group.add_argument("--dist-eval", action=BOOL, default=False, help="split validation over the processes")
    group.add_argument("--compile", action=BOOL, default=False, help="torch.compile the model")
    group.add_argument("--channels-last", action=BOOL, default=False,
                       help="channels-last memory format for the model and its inputs: faster convolutions on most "
                            "CPUs and on GPUs with --amp")
    group.add_argument("--print-freq", type=int, default=50, help="steps between progress lines (when not a TTY)")


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


def add_embedding_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The loss (cross-entropy or a metric loss on normalised style vectors) and the batch sampler."""
    group = parser.add_argument_group("loss and sampler (see docs/galleries.md)")
    group.add_argument("--loss", default="ce", choices=LOSSES,
                       help="ce: classifier cross-entropy; arcface / subcenter-arcface / supcon: a metric loss on the "
                            "L2-normalised style vectors (the head is then a probe on the detached vectors)")
    group.add_argument("--loss-scale", type=float, default=30.0, help="ArcFace scale s")
    group.add_argument("--loss-margin", type=float, default=0.3, help="ArcFace additive angular margin (radians)")
    group.add_argument("--subcenters", type=int, default=3, help="sub-centres per class of subcenter-arcface")
    group.add_argument("--temperature", type=float, default=0.1, help="supcon temperature")
    group.add_argument("--sampler", default="random", choices=("random", "class-balanced"),
                       help="class-balanced: every artist equally often, in groups of --samples-per-class (replaces "
                            "--repeated-aug)")
    group.add_argument("--samples-per-class", type=int, default=4, metavar="K",
                       help="images per artist in each group of the class-balanced sampler")
    group.add_argument("--epoch-repeats", type=int, default=1, metavar="N",
                       help="passes over the training images per epoch (small data: more steps per epoch)")
    return parser


def add_multilabel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of multi-label training: the annotation CSVs, the threshold and the loss weights."""
    group = parser.add_argument_group("multi-label")
    group.add_argument("--train-ann", required=True, metavar="CSV",
                       help="training annotations (image_path,labels); its labels are the model's classes")
    group.add_argument("--val-ann", required=True, metavar="CSV", help="validation annotations")
    group.add_argument("--label-delimiter", default=",", help="separator of the labels inside the labels field")
    group.add_argument("--threshold", type=float, default=0.4,
                       help="confidence at which a label counts as predicted (precision, recall, F1)")
    group.add_argument("--max-pos-weight", type=float, default=10.0,
                       help="upper clip of the per-label positive weight (negatives / positives) of the loss")
    group.add_argument("--allow-outside-root", action="store_true",
                       help="use CSV rows whose image lies outside --data-path (otherwise they are left out)")
    # Mixup / cutmix mix the targets too: off unless asked for. Label smoothing only acts through them.
    parser.set_defaults(mixup=0.0, cutmix=0.0, smoothing=0.0)
    return parser
