"""The training recipe: settings chosen from the shape of the data and of the run, each with its reason.

:func:`choose_recipe` is a pure function of a :class:`DataShape` (images, classes, images per class) and a
:class:`RunShape` (epochs, batch, processes, pretrained or not). ``--recipe imagenet`` keeps the DeiT / LSNet
ImageNet defaults of the flags (its batch, like every recipe's, follows the data); ``finetune`` is for pretrained
weights; ``auto`` picks ``finetune`` when the run starts from pretrained weights and sizes the from-scratch settings
to the data otherwise. Every recipe chooses ``--batch-size`` when none is given. Flags the user gave always win
(:func:`apply_recipe`, which returns the changed typed configuration). The recipe is chosen from the scan of the
training images, before any dataset or transform is built; it is stored in ``config.json`` (``recipe``), and
``--resume`` reuses it.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import utils
from artifacts.run_folder import ResumePoint
from training.config import DEIT_BATCH, RECIPES, TrainConfig
from utils import UserError

__all__ = ["RECIPES", "Choice", "DataShape", "Recipe", "RunShape", "apply_recipe", "choose_recipe",
           "prepare_recipe", "recipe_block"]

MIN_BATCH = 8  # the smallest batch the recipe chooses (batch statistics of the normalisation layers)
MIN_BATCHES = 3  # batches per epoch and process the recipe's batch leaves at least (when the data allow MIN_BATCH):
# 126 images train at 32, the batch bench_recipe.py --medium measured best (16 saw 2.5x fewer images in 30 epochs)
DEIT_EMA_DECAY = 0.99996
LARGE_DATA = 50_000  # images from which repeated augmentation pays off (DeiT's ImageNet regime), with processes > 1
LONG_RUN = 100  # epochs from which mixup / cutmix pay off
MIN_INPUT = 64  # the smallest input size the recipe trains small images at
MIN_STEPS = 400  # optimizer steps a short run on little data gets at least (by passes per epoch)
MAX_REPEATS = 8  # passes over the training images per epoch at most
MIN_REPEAT_EPOCHS = 10  # shorter runs check the pipeline: one pass per epoch


@dataclass(frozen=True)
class DataShape:
    """The training data: images, classes (labels), the smallest and largest class (images per class), and the
    median shorter side of the images in pixels (None: unknown)."""

    images: int
    classes: int
    smallest: int
    largest: int
    image_side: int | None = None

    @classmethod
    def from_counts(cls, counts: Sequence[int], images: int | None = None,
                    image_side: int | None = None) -> "DataShape":
        """From images per class (multi-label: positives per label, with ``images`` the image count)."""
        counts = [int(c) for c in counts] or [0]
        return cls(int(images if images is not None else sum(counts)), len(counts), min(counts), max(counts),
                   image_side)

    @classmethod
    def from_labels(cls, targets: Sequence[int], num_classes: int, image_side: int | None = None) -> "DataShape":
        """From the class id of every training image."""
        counts = [0] * num_classes
        for target in targets:
            counts[target] += 1
        return cls.from_counts(counts, image_side=image_side)

    @property
    def per_class(self) -> float:
        return self.images / max(self.classes, 1)

    def describe(self) -> str:
        side = f", {self.image_side} px" if self.image_side else ""
        return (f"{self.images} images, {self.classes} classes ({self.per_class:.0f} per class, "
                f"{self.smallest}..{self.largest}){side}")


@dataclass(frozen=True)
class RunShape:
    """The run: epochs, batch per process, processes, accumulation, pretrained start, multi-label targets, and the
    model's default input size."""

    epochs: int
    batch_size: int | None  # None: the recipe chooses it
    world_size: int = 1
    accumulation_steps: int = 1
    pretrained: bool = False
    multi_label: bool = False
    input_size: int = 224

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation_steps

    def steps(self, images: int) -> int:
        """Optimizer steps of the whole run (at least 1)."""
        per_epoch = max(images // (self.batch_size * self.world_size), 1) / self.accumulation_steps
        return max(int(per_epoch * self.epochs), 1)


@dataclass(frozen=True)
class Choice:
    """One chosen setting (a flag's value) and why."""

    value: Any
    reason: str


@dataclass(frozen=True)
class Recipe:
    """The recipe's name, why it was chosen, and its settings by flag name (``args`` attribute) with reasons."""

    name: str
    why: str
    choices: Mapping[str, Choice] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        return {name: choice.value for name, choice in self.choices.items()}

    def as_dict(self) -> dict[str, Any]:
        """The ``config.json`` entry: name, why, and ``{flag: {"value", "reason"}}``."""
        return {"name": self.name, "why": self.why,
                "settings": {k: {"value": c.value, "reason": c.reason} for k, c in self.choices.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """The inverse of :meth:`as_dict` (lists come back as lists)."""
        choices = {k: Choice(v["value"], v["reason"]) for k, v in dict(data.get("settings", {})).items()}
        return cls(str(data["name"]), str(data.get("why", "")), MappingProxyType(choices))


def choose_recipe(requested: str, data: DataShape, run: RunShape) -> Recipe:
    """The recipe ``requested`` (``auto``, ``imagenet`` or ``finetune``) for this data and run."""
    if requested not in RECIPES:
        raise UserError(f"unknown --recipe {requested!r}; use one of {', '.join(RECIPES)}")
    batch = _batch(data, run)
    if batch:
        run = dataclasses.replace(run, batch_size=batch["batch_size"].value)
    if requested == "imagenet":
        return Recipe("imagenet", "asked for (--recipe imagenet): the DeiT / LSNet ImageNet defaults of every flag, "
                      "the learning rate scaled linearly from batch 512", MappingProxyType(batch))
    name, why = requested, "asked for (--recipe finetune)"
    if requested == "auto":
        name = "finetune" if run.pretrained else "scratch"
        why = ("auto: the run starts from pretrained weights" if run.pretrained
               else "auto: the run starts from random weights")
    run = dataclasses.replace(run, pretrained=name == "finetune")  # --recipe finetune: tuned as for pretrained
    passes = _passes(data, run)
    repeats = passes["epoch_repeats"].value if passes else 1
    choices = {**batch, **_resolution(data, run), **passes, **_schedule(data, run), **_augmentation(run),
               **_regularisation(data, run, repeats)}
    return Recipe(name, why, MappingProxyType(choices))


def _batch(data: DataShape, run: RunShape) -> dict[str, Choice]:
    """The batch per process when none is given: the largest power of two that leaves every process at least
    MIN_BATCHES batches per epoch, within MIN_BATCH..DEIT_BATCH."""
    if run.batch_size is not None:
        return {}
    per_process = max(data.images // (MIN_BATCHES * run.world_size), 1)
    batch = min(DEIT_BATCH, max(MIN_BATCH, 2 ** int(math.log2(per_process))))
    return {"batch_size": Choice(batch, f"{data.images} images on {run.world_size} process(es): the largest power "
                                        f"of two leaving at least {MIN_BATCHES} batches per epoch and process, "
                                        f"{MIN_BATCH}..{DEIT_BATCH} (DeiT's)")}


def _resolution(data: DataShape, run: RunShape) -> dict[str, Choice]:
    """The input size from scratch: images smaller than the model's input are trained at about their own size
    (pretrained weights keep the size they were trained at)."""
    if run.pretrained or data.image_side is None or data.image_side >= run.input_size:
        return {}
    side = max(MIN_INPUT, data.image_side // 32 * 32)
    return {"input_size": Choice(side, f"the images are {data.image_side} px (median shorter side): upscaled to "
                                       f"{run.input_size} they blur the strokes and grain that tell artists apart "
                                       f"(measured: bench/bench_recipe.py's medium worlds), so {side} (a multiple "
                                       f"of 32, at least {MIN_INPUT})")}


def _passes(data: DataShape, run: RunShape) -> dict[str, Choice]:
    """Passes over the training images per epoch: enough optimizer steps for a short run on little data."""
    if run.multi_label:
        return {}
    if run.epochs < MIN_REPEAT_EPOCHS:
        return {"epoch_repeats": Choice(1, f"{run.epochs} epochs: a check of the pipeline keeps one pass per epoch "
                                           f"(more passes for little data from {MIN_REPEAT_EPOCHS} epochs)")}
    steps = run.steps(data.images)
    repeats = min(MAX_REPEATS, math.ceil(MIN_STEPS / steps))
    reason = (f"{data.images} images at batch {run.effective_batch} make {steps} optimizer steps in {run.epochs} "
              f"epochs, too few to fit (bench/bench_recipe.py --medium): at least {MIN_STEPS}, at most "
              f"{MAX_REPEATS} passes per epoch" if repeats > 1 else
              f"{steps} optimizer steps in {run.epochs} epochs are enough (more passes from below {MIN_STEPS})")
    return {"epoch_repeats": Choice(max(repeats, 1), reason)}


def _augmentation(run: RunShape) -> dict[str, Choice]:
    """RandAugment and colour jitter off in short single-label runs: they rewrite the colour, contrast and sharpness
    that make a style (measured on the medium worlds of bench/bench_recipe.py)."""
    if run.epochs >= LONG_RUN or run.multi_label:  # measured on single-label runs only
        return {}
    reason = (f"{run.epochs} epochs: RandAugment's colour, contrast, posterize and sharpness operations and colour "
              "jitter change the palette, quantisation and blur that tell artists apart (on from "
              f"{LONG_RUN} epochs with the flags' defaults)")
    return {"aa": Choice(None, reason), "color_jitter": Choice(0.0, reason)}


def _schedule(data: DataShape, run: RunShape) -> dict[str, Choice]:
    """Learning rate, warm-up and cool-down (fractions of the run), repeated augmentation."""
    batch, finetune = run.effective_batch, run.pretrained
    top = 1e-3 if finetune else 4e-3  # measured (bench/bench_recipe.py): 4e-3 beat 2e-3 at batch 16 from scratch
    lr = float(f"{top * math.sqrt(min(batch, 16) / 16):.3g}")
    start = "pretrained weights" if finetune else "random weights"
    warm_share, warm_cap = (0.03, 2) if finetune else (0.05, 5)
    warmup = min(warm_cap, round(warm_share * run.epochs))
    cooldown = run.epochs // 30
    large = data.images >= LARGE_DATA and run.world_size > 1
    return {
        "lr_abs": Choice(lr, f"AdamW from {start} at effective batch {batch}: {top:g} (x sqrt(batch / 16) below "
                             "16; linear scaling from 512 starves small batches)"),
        "warmup_epochs": Choice(warmup, f"{warm_share:.0%} of {run.epochs} epochs (rounded), at most {warm_cap}; the "
                                        "rate rises at every optimizer step"),
        "cooldown_epochs": Choice(cooldown, f"1/30 of {run.epochs} epochs at the minimum LR (DeiT: 10 of 300)"),
        "repeated_aug": Choice(large, "large data on several processes" if large else
                               f"{data.images} images on {run.world_size} process(es): 3 copies of each image per "
                               "epoch would only make epochs less varied (on from 50000 images on 2+ processes)"),
    }


def _regularisation(data: DataShape, run: RunShape, repeats: int = 1) -> dict[str, Choice]:
    """Mixup / cutmix, label smoothing, EMA decay and weight decay sized to the data and the run."""
    choices: dict[str, Choice] = {}
    if not run.multi_label:
        long_run = run.epochs >= LONG_RUN
        mix = (0.8, 1.0) if long_run else (0.0, 0.0)
        reason = (f"{run.epochs} epochs: long enough for mixed images to pay off" if long_run else
                  f"{run.epochs} epochs: mixed images slow short runs down (on from {LONG_RUN} epochs)")
        choices["mixup"] = Choice(mix[0], reason)
        choices["cutmix"] = Choice(mix[1], reason)
        choices["smoothing"] = Choice(0.1, "label smoothing 0.1 helps at every size")
    steps = run.steps(data.images * repeats)
    decay = min(DEIT_EMA_DECAY, max(0.9, 1 - 10 / steps))
    choices["model_ema_decay"] = Choice(float(f"{decay:.6g}"),
                                        f"averages about the last 10% of the {steps} optimizer steps")
    choices["weight_decay"] = Choice(0.025, f"{data.per_class:.0f} images per class: LSNet's 0.025 (0.05 gave no "
                                            "gain on 5-40 images per class in bench/bench_recipe.py)")
    choices["reprob"] = Choice(0.25 if run.epochs >= 30 else 0.0,
                               "random erasing from 30 epochs on" if run.epochs >= 30 else
                               f"{run.epochs} epochs: random erasing slows short runs down (on from 30 epochs)")
    return choices


def apply_recipe(cfg: TrainConfig, recipe: Recipe) -> TrainConfig:
    """``cfg`` with the recipe's settings, except for the flags the user gave (``--lr`` given keeps ``--lr``)."""
    return cfg.with_settings({name: value for name, value in recipe.settings.items()
                              if not _user_set(cfg.explicit, name)})


def _user_set(explicit: frozenset[str], name: str) -> bool:
    """Whether the user chose ``name`` (for ``lr_abs``: also ``--lr``, the other way to give the LR)."""
    return name in explicit or (name == "lr_abs" and "lr" in explicit)


def recipe_block(recipe: Recipe, explicit: frozenset[str], header: str) -> str:
    """The start-up lines: ``recipe NAME for ...: why``, then one line per setting with its reason."""
    lines = [f"recipe: {recipe.name} for {header} because {recipe.why}"]
    for name, choice in recipe.choices.items():
        flag = "--" + name.replace("_", "-")
        if _user_set(explicit, name):
            lines.append(f"  {flag}: your flag wins (the recipe would use {choice.value})")
        else:
            lines.append(f"  {flag} {_show(choice.value)} because {choice.reason}")
    if not recipe.choices:
        lines.append("  every flag keeps its default")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def saved_recipe(point: ResumePoint) -> Recipe | None:
    """The recipe stored in a training checkpoint's ``config`` (None for runs from before recipes)."""
    stored = point.raw.get("config", {}).get("recipe")
    return Recipe.from_dict(stored) if isinstance(stored, Mapping) else None


def prepare_recipe(cfg: TrainConfig, data: DataShape, world_size: int, multi_label: bool = False,
                   resume: ResumePoint | None = None) -> tuple[TrainConfig, Recipe]:
    """Choose the recipe (``resume``: the checkpoint's), print it and apply it; returns the new configuration."""
    recipe = saved_recipe(resume) if resume is not None else None
    run = RunShape(cfg.optim.epochs, cfg.optim.batch_size, world_size, cfg.optim.accumulation_steps,
                   pretrained=bool(cfg.model.pretrained or cfg.model.finetune_from), multi_label=multi_label,
                   input_size=cfg.model.input_size)
    if recipe is None:
        recipe = choose_recipe(cfg.optim.recipe, data, run)
        batch = run.batch_size or recipe.settings["batch_size"]
        effective = batch * world_size * run.accumulation_steps
        header = f"{data.describe()}, {run.epochs} epochs, effective batch {effective}"
    else:
        header = f"the run resumed from {resume.path} (its recipe is kept)"
    utils.print_main(recipe_block(recipe, cfg.explicit, header))
    cfg = apply_recipe(cfg, recipe)
    if cfg.optim.batch_size is None:  # a run from before the recipe chose batches: its own batch (or the old default)
        saved = resume.raw.get("args", {}).get("batch_size") if resume is not None else None
        cfg = cfg.with_settings({"batch_size": saved or DEIT_BATCH})
    return cfg, recipe
