"""The settings of ``train_glance_focus.py``, each declared once (:func:`training.settings.setting`).

What glance and focus shares with the main training script (data path, output folder, device, seed, loading
processes, AMP, progress lines, micro-batches, weight decay) reuses the main declarations
(:func:`training.settings.same_as`); what is its own (views, stages, the policy, PPO, calibration and evaluation) is
declared here. From the sections come the flags, the ``--config`` keys, the range checks, the typed
:class:`GlanceFocusConfig` and ``args.json``.
"""

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

import utils
from training.config import OptimConfig, RunConfig, resolve_amp
from training.distributed import DistEnv
from training.settings import (
    EXPLICIT,
    SettingsParser,
    add_section,
    build_section,
    check_section,
    same_as,
    section_values,
    setting,
)
from utils import NumberRange

__all__ = ["GF_SECTIONS", "EvalSettings", "GlanceFocusConfig", "PPOSettings", "StageConfig", "StageSettings",
           "ViewSettings", "WorkSettings", "get_args_parser"]

STAGES = (1, 2, 3)
_SIZE, _COUNT, _SIDE = NumberRange(int, 1), NumberRange(int, 0), NumberRange(int, 32)
_POSITIVE, _SHARE = NumberRange(float, 0, low_open=True), NumberRange(float, 0, 1)


@dataclass(frozen=True)
class ViewSettings:
    """The model and what it reads: glance, focus crops, their resolution and number, the encoders' start."""

    model: str = setting("lsnet_t_gf", "lsnet_t_gf, lsnet_s_gf or lsnet_b_gf", choices=(
        "lsnet_t_gf", "lsnet_s_gf", "lsnet_b_gf"))
    glance_size: int = setting(128, "side of the whole-image glance", allowed=_SIDE)
    patch_size: int = setting(96, "side of each focus crop", allowed=_SIDE)
    focus_resolution: int = setting(672, "short side of the image crops are read from (0: native size)",
                                    allowed=_COUNT)
    focus_steps: int = setting(4, "focus steps T after the glance", allowed=_SIZE)
    init_from: str | None = setting(None, "trained artist model folder (or LSNet checkpoint) for both encoders",
                                    metavar="PATH")


@dataclass(frozen=True)
class StageSettings:
    """Which stages run, their epochs, batch and learning rates (used as given: no scaling with the batch)."""

    stage: str = setting("all", "the stages to run (each resumes from its stage<N>.pth)",
                         choices=("1", "2", "3", "all"))
    epochs: tuple[int, ...] = setting((30, 10, 10), "epochs of stage 1, 2, 3 (one value: all stages)",
                                      allowed=_SIZE)
    batch_size: int = setting(32, "per process under torchrun", allowed=_SIZE)
    lr: float = setting(1e-3, "stage 1 (stage 3 uses a tenth); cosine decay per optimizer step", allowed=_POSITIVE)
    policy_lr: float = setting(3e-4, "stage 2 (PPO)", allowed=_POSITIVE)
    accumulation_steps: int = same_as(OptimConfig, "accumulation_steps")
    weight_decay: float = same_as(OptimConfig, "weight_decay", default=0.05, help="AdamW weight decay of stages 1 "
                                  "and 3 (the policy has none)")


@dataclass(frozen=True)
class PPOSettings:
    """Stage 2: the policy's PPO updates and the GFNet reward."""

    ppo_epochs: int = setting(4, "clipped-surrogate updates per rollout", allowed=_SIZE)
    ppo_clip: float = setting(0.2, "PPO ratio clip", allowed=NumberRange(float, 0, 1, low_open=True))
    gamma: float = setting(0.7, "discount of later steps' rewards", allowed=_SHARE)
    entropy_coef: float = setting(0.01, "entropy bonus of the crop distribution", allowed=NumberRange(float, 0))


@dataclass(frozen=True)
class WorkSettings:
    """Data, output folder, device, seeding, loading processes, AMP, progress lines: as in the main training."""

    data_path: str | None = same_as(RunConfig, "data_path", required=True,
                                    help="prepared dataset with train/ and val/")
    output_dir: str | None = same_as(RunConfig, "output_dir", required=True,
                                     help="run and model folder (stages resume from it)")
    device: str | None = same_as(RunConfig, "device")
    seed: int = same_as(RunConfig, "seed")
    num_workers: int = same_as(RunConfig, "num_workers", aliases=("--workers",))
    amp: bool | None = same_as(RunConfig, "amp")
    print_freq: int = same_as(RunConfig, "print_freq")


@dataclass(frozen=True)
class EvalSettings:
    """Budget calibration and evaluation of a trained folder."""

    calibrate_budget: bool = setting(False, "store per-step exit thresholds for budgets (found on --calibrate-on) "
                                            "in config.json")
    calibrate_on: str = setting("train", "folder under --data-path the budget thresholds are found on (a held-out "
                                         "split such as val or calib when the model has memorised a small train/)",
                                metavar="SPLIT")
    eval: bool = setting(False, "evaluate the model folder on val/ (no training)")
    exit_threshold: float | None = setting(None, "with --eval: also report this early-exit rule",
                                           allowed=NumberRange(float, 0, 1))
    reference: str | None = setting(None, "with --eval: a plain artist model folder measured as reference",
                                    metavar="PATH")
    reference_sizes: tuple[int, ...] = setting((224, 0), "sizes the reference is measured at (0: the full focus "
                                                         "resolution)", allowed=_COUNT)
    save_crops: str | None = setting(None, "with --eval: folder for val images with their crops drawn",
                                     metavar="PATH")


GF_SECTIONS: dict[str, tuple[type, str]] = {
    "views": (ViewSettings, "model and views"), "stages": (StageSettings, "stages and optimisation"),
    "ppo": (PPOSettings, "stage 2 (PPO)"), "work": (WorkSettings, "run control"),
    "evaluation": (EvalSettings, "calibration and evaluation"),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of ``train_glance_focus.py`` (plus ``--config run.yaml``)."""
    parser = SettingsParser("train_glance_focus", description="Train, calibrate and evaluate a glance-and-focus "
                            "LSNet (GFNet) that reads high-resolution artwork in crops.")
    for section, title in GF_SECTIONS.values():
        add_section(parser, section, title)
    return parser


@dataclass(frozen=True)
class GlanceFocusConfig:
    """Everything ``train_glance_focus.py`` is configured with, grouped by concern; built once by
    :meth:`from_args` (ranges checked, ``--amp`` resolved for the device)."""

    views: ViewSettings
    stages: StageSettings
    ppo: PPOSettings
    work: WorkSettings
    evaluation: EvalSettings
    explicit: frozenset[str] = frozenset()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GlanceFocusConfig":
        """Check the parsed flags (one line for the first out of range) and build the configuration."""
        values = {key: value for key, value in vars(args).items() if key not in (EXPLICIT, "config")}
        for section, _ in GF_SECTIONS.values():
            check_section(section, values)
        values["amp"] = resolve_amp(values.get("amp"), utils.resolve_device(values.get("device")))
        sections = {name: build_section(section, values) for name, (section, _) in GF_SECTIONS.items()}
        return cls(**sections, explicit=frozenset(getattr(args, EXPLICIT, ())))

    def settings(self) -> dict[str, Any]:
        """Every setting's value by name: the record saved as ``args.json``."""
        return {name: value for attr in GF_SECTIONS for name, value in section_values(getattr(self, attr)).items()}

    def stage_list(self) -> list[int]:
        """The stages ``--stage`` asks for, in order."""
        return list(STAGES) if self.stages.stage == "all" else [int(self.stages.stage)]

    def stage(self, stage: int, dist: DistEnv) -> "StageConfig":
        """What stage ``stage``'s loop needs: its epochs (``--epochs``: one value or one per stage) and learning
        rate (stage 2 ``--policy-lr``, stage 3 a tenth of ``--lr``)."""
        epochs = self.stages.epochs[min(stage - 1, len(self.stages.epochs) - 1)]
        lr = self.stages.policy_lr if stage == 2 else self.stages.lr * (0.1 if stage == 3 else 1.0)
        return StageConfig(epochs=epochs, lr=lr, dist=dist, stages=self.stages, ppo=self.ppo, work=self.work)


@dataclass
class StageConfig:
    """One stage's epochs and learning rate, this process's place in a torchrun run (and its device), and the
    settings sections the loop reads (default: the declared defaults)."""

    epochs: int
    lr: float
    dist: DistEnv = field(default_factory=DistEnv)
    stages: StageSettings = StageSettings()
    ppo: PPOSettings = PPOSettings()
    work: WorkSettings = WorkSettings()

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def amp(self) -> bool:
        return bool(self.work.amp)

    def schedule(self) -> OptimConfig:
        """The stage's learning-rate schedule in the main engine's terms: cosine from ``lr`` to 0 over its epochs,
        no warm-up or cooldown (stepped per optimizer step by :func:`training.factory.build_scheduler`)."""
        return OptimConfig(epochs=self.epochs, lr=self.lr, sched="cosine", min_lr=0.0, warmup_epochs=0,
                           cooldown_epochs=0, accumulation_steps=self.stages.accumulation_steps)

