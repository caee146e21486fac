"""The model folder inference loads: which checkpoint file, ``class_mapping.csv`` and ``config.json``.

A model folder is what training writes (``model_best.pth`` + ``class_mapping.csv`` + ``config.json``), what the
original artist scripts and community models publish (``best_checkpoint.pth`` + ``class_mapping.csv`` +
``config.json``), or a bare checkpoint file (official LSNet weights, original-fork checkpoints). This module owns
the ``config.json`` schema: :func:`build_config` makes it, :func:`write_config` writes it, :func:`read_config` reads it;
:func:`read_model_spec` reads a whole model folder into a checked :class:`ModelSpec` that builds the network.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from artifacts.checkpoint import (
    BEST_FILE,
    MODEL_FOLDER_FILES,
    Checkpoint,
    find_checkpoint,
    guess_architecture,
    load_checkpoint,
    read_checkpoint,
)
from artifacts.config_file import CONFIG_FILE, read_config
from artifacts.hub import resolve_hub_path
from data.class_mapping import CLASS_MAPPING_FILE, compare_class_mappings, read_class_mapping
from data.transforms import eval_data_config
from model.lsnet_artist import ARTIST_MODELS
from utils import UserError


@dataclass
class ModelSource:
    """Where a model's pieces are: the checkpoint file, its class mapping and its ``config.json`` (if any)."""

    checkpoint: Path
    class_csv: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


def build_config(model_name: str, model: nn.Module, input_size: int, squash: bool = False,
                 **extra: Any) -> dict[str, Any]:
    """``config.json``: what inference needs to rebuild ``model`` and its preprocessing.

    ``squash``: evaluated with a plain resize to ``input_size`` (fine-tuned that way) instead of resize + center
    crop. ``extra`` entries (e.g. ``multi_label``) are added as they are.
    """
    evaluation = eval_data_config(input_size, squash, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    return {
        "model": model_name, "num_classes": model.num_classes, "feature_dim": model.head_hidden_size,
        "use_projection": model.use_projection, "distillation": model.distillation, "input_size": input_size,
        "mean": list(evaluation["mean"]), "std": list(evaluation["std"]),
        **{key: evaluation[key] for key in ("crop_pct", "crop_mode", "interpolation")},
        "checkpoint": BEST_FILE, "class_mapping": CLASS_MAPPING_FILE, **extra,
    }


# Keys of a source folder's config.json that describe how the model was trained and is evaluated: an exported
# folder keeps them (its preprocessing and output activation must stay those of the source).
_CARRIED_KEYS = ("crop_pct", "crop_mode", "mean", "std", "interpolation", "multi_label")


def build_export_config(model_name: str, model: nn.Module, input_size: int, source_config: dict[str, Any],
                        file_format: str, weights_file: str, **fields: Any) -> dict[str, Any]:
    """``config.json`` of an exported folder (``export.py``): :func:`build_config`, the source folder's
    preprocessing and ``multi_label`` flag, ``format`` (``onnx`` or ``safetensors``), ``checkpoint`` (the weights
    file) and ``fields`` (for ONNX: ``onnx`` with the opset, exporter versions, input/output names and whether the
    input size is dynamic)."""
    config = build_config(model_name, model, input_size)
    config.update({key: source_config[key] for key in _CARRIED_KEYS if key in source_config})
    config.update(format=file_format, checkpoint=weights_file, **fields)
    return config


def resolve_model_source(checkpoint: str | os.PathLike, class_csv: str | os.PathLike | None = None) -> ModelSource:
    """Resolve a checkpoint file or a model folder (checkpoint + ``class_mapping.csv`` + optional ``config.json``).

    A folder supplies its ``config.json`` and, unless ``class_csv`` is given, its class mapping; a file uses
    only ``class_csv``.
    """
    path = resolve_hub_path(checkpoint)
    if path.is_file():
        return ModelSource(path, Path(class_csv) if class_csv else None)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}; pass a .pth file or a model folder holding one")
    config = read_config(path / CONFIG_FILE)
    if config.get("format") == "onnx":
        raise UserError(f"{path} is an exported ONNX folder: it runs with onnxruntime (inference_artist.py, "
                        "load_model_bundle) but holds no PyTorch weights; use the folder it was exported from")
    preferred = [config["checkpoint"]] if isinstance(config.get("checkpoint"), str) else []
    found = find_checkpoint(path, [*preferred, *MODEL_FOLDER_FILES])
    if class_csv is None and (path / CLASS_MAPPING_FILE).is_file():
        class_csv = path / CLASS_MAPPING_FILE
    return ModelSource(found, Path(class_csv) if class_csv else None, config, path)


# --------------------------------------------------------------------------------------------- the model a folder holds


@dataclass
class ModelSpec:
    """What a model folder (or checkpoint file) says the model is, checked for agreement: :meth:`build` makes it."""

    name: str  # registered timm architecture
    checkpoint: Checkpoint
    class_names: list[str] | None
    config: dict[str, Any]  # the folder's config.json over the one stored in the checkpoint
    num_classes: int | None
    feature_dim: int | None
    input_size: int | None  # the training size recorded with the checkpoint, else config.json's

    def build(self) -> nn.Module:
        """The network with the checkpoint's weights loaded strictly (every key and shape must match)."""
        net = timm.create_model(self.name, num_classes=self.num_classes or 0, feature_dim=self.feature_dim,
                                distillation=self.checkpoint.distillation)
        load_checkpoint(self.checkpoint, net)
        return net


def _square_size(value: Any, source: str) -> int:
    """An input size given as ``224``, ``[224, 224]`` or ``[3, 224, 224]`` (square only)."""
    sizes = [value] if isinstance(value, (int, float)) else list(value)[-2:]
    if not sizes or any(int(s) != sizes[0] or int(s) <= 0 for s in sizes):
        raise UserError(f"{source}: input size {value!r} is not a positive square size; pass --input-size")
    return int(sizes[0])


def _recorded_input_size(ckpt: Checkpoint, config: dict[str, Any]) -> int | None:
    for label, value in ((f"{ckpt.path} args", ckpt.args.get("input_size")), (CONFIG_FILE, config.get("input_size"))):
        if value is not None:
            return _square_size(value, label)
    return None


def _agreed_value(label: str, values: dict[str, int | None]) -> int | None:
    """The one value the given sources agree on (None when none gives one); a disagreement is a UserError."""
    given = {source: value for source, value in values.items() if value is not None}
    if len(set(given.values())) > 1:
        detail = ", ".join(f"{source} has {value}" for source, value in given.items())
        raise UserError(f"{label} disagree: {detail}; use the class_mapping.csv and settings trained with it")
    return next(iter(given.values()), None)


def _model_name(explicit: str | None, config: dict[str, Any], source: ModelSource, ckpt: Checkpoint) -> str:
    name = explicit or config.get("model") or ckpt.args.get("model")
    if not name:
        where = f"{source.folder / CONFIG_FILE} is missing and " if source.folder else ""
        guess = guess_architecture(ckpt.state_dict)
        hint = f" (the weights look like {guess})" if guess else ""
        raise UserError(f"{where}{ckpt.path} does not record its architecture; pass --model{hint}, one of "
                        f"{', '.join(ARTIST_MODELS)}")
    if name not in ARTIST_MODELS:
        raise UserError(f"unknown model {name!r}; use one of {', '.join(ARTIST_MODELS)}")
    return name


def _check_class_names(ckpt: Checkpoint, class_csv: Path | None, class_names: list[str] | None) -> None:
    """A class mapping needs a head, and must equal the class names training stored in the checkpoint (if any)."""
    if class_names is None:
        return
    if ckpt.num_classes is None:
        raise UserError(f"{ckpt.path} has no classifier head, so it cannot classify; use --mode cluster")
    stored_names = ckpt.extra.get("class_names")
    if isinstance(stored_names, list):
        differences = compare_class_mappings(stored_names, class_names, ckpt.path.name, str(class_csv))
        if differences:
            raise UserError(f"{class_csv} does not match the class names stored in {ckpt.path.name} "
                            f"({differences[0]}); use the class_mapping.csv written with this checkpoint")


def read_model_spec(
    checkpoint: str | os.PathLike,
    class_csv: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    feature_dim: int | None = None,
    require_class_names: bool = False,
) -> ModelSpec:
    """Read a model folder or checkpoint file (see :func:`resolve_model_source`) and check that its pieces agree.

    ``model_name`` overrides the recorded architecture; ``num_classes`` and ``feature_dim`` are checked against the
    weights, the class mapping and ``config.json``. ``require_class_names`` fails before reading the weights when no
    class mapping is available. Every problem is a one-line :class:`UserError`.
    """
    source = resolve_model_source(checkpoint, class_csv)
    if require_class_names and source.class_csv is None:
        sibling = source.checkpoint.parent / CLASS_MAPPING_FILE
        hint = f"--class-csv {sibling}" if sibling.is_file() else f"--class-csv with the {CLASS_MAPPING_FILE} " \
            "written by training next to the checkpoint"
        raise UserError(f"classification needs the class names of {source.checkpoint.name}; pass {hint}")
    class_names = read_class_mapping(source.class_csv) if source.class_csv else None
    ckpt = read_checkpoint(source.checkpoint)
    # Training also stores its config.json in the checkpoint; a folder's config.json takes precedence.
    embedded = ckpt.extra.get("config")
    config = {**(embedded if isinstance(embedded, dict) else {}), **source.config}
    name = _model_name(model_name, config, source, ckpt)
    num_classes = _agreed_value("class counts", {
        f"the checkpoint's head ({ckpt.path.name})": ckpt.num_classes,
        f"{source.class_csv}": len(class_names) if class_names is not None else None,
        "--num-classes": num_classes,
        CONFIG_FILE: config.get("num_classes"),
    })
    _check_class_names(ckpt, source.class_csv, class_names)
    feature_dim = _agreed_value("feature sizes", {
        f"the checkpoint's weights ({ckpt.path.name})": ckpt.feature_dim,
        "--feature-dim": feature_dim,
        CONFIG_FILE: config.get("feature_dim"),
    })
    return ModelSpec(name, ckpt, class_names, config, num_classes, feature_dim, _recorded_input_size(ckpt, config))
