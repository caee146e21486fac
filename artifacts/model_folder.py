"""The model folder inference loads: which checkpoint file, ``class_mapping.csv`` and ``config.json``.

A model folder is what training writes (``model_best.pth`` + ``class_mapping.csv`` + ``config.json``), what the
original artist scripts and community models publish (``best_checkpoint.pth`` + ``class_mapping.csv`` +
``config.json``), or a bare checkpoint file (official LSNet weights, original-fork checkpoints). This module owns
the ``config.json`` schema: :func:`build_config` makes it, :func:`write_config` writes it, :func:`read_config` reads it.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from artifacts.checkpoint import BEST_FILE, MODEL_FOLDER_FILES, find_checkpoint
from data.class_mapping import CLASS_MAPPING_FILE
from data.datasets import EVAL_CROP_PCT
from utils import UserError

CONFIG_FILE = "config.json"


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
    cfg = model.pretrained_cfg
    return {
        "model": model_name, "num_classes": model.num_classes, "feature_dim": model.feature_dim,
        "use_projection": model.use_projection, "distillation": model.distillation, "input_size": input_size,
        "mean": list(cfg["mean"]), "std": list(cfg["std"]),
        "crop_pct": 1.0 if squash else EVAL_CROP_PCT, "crop_mode": "squash" if squash else "center",
        "interpolation": "bicubic", "checkpoint": BEST_FILE, "class_mapping": CLASS_MAPPING_FILE, **extra,
    }


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as indented UTF-8 JSON through a temporary file renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_config(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``config.json`` (from :func:`build_config`) into ``folder``."""
    write_json_atomic(Path(folder) / CONFIG_FILE, config)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A ``config.json`` file (or the one inside a folder) as a dict; ``{}`` when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or delete it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object with keys such as 'model'; fix or delete it")
    return config


def resolve_model_source(checkpoint: str | os.PathLike, class_csv: str | os.PathLike | None = None) -> ModelSource:
    """Resolve a checkpoint file or a model folder (checkpoint + ``class_mapping.csv`` + optional ``config.json``).

    A folder supplies its ``config.json`` and, unless ``class_csv`` is given, its class mapping; a file uses
    only ``class_csv``.
    """
    path = Path(checkpoint)
    if path.is_file():
        return ModelSource(path, Path(class_csv) if class_csv else None)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}; pass a .pth file or a model folder holding one")
    config = read_config(path / CONFIG_FILE)
    preferred = [config["checkpoint"]] if isinstance(config.get("checkpoint"), str) else []
    found = find_checkpoint(path, [*preferred, *MODEL_FOLDER_FILES])
    if class_csv is None and (path / CLASS_MAPPING_FILE).is_file():
        class_csv = path / CLASS_MAPPING_FILE
    return ModelSource(found, Path(class_csv) if class_csv else None, config, path)
