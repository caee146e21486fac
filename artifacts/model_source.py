"""Where a model's files are, without reading them: the checkpoint file of a model folder (or the file itself), its
``class_mapping.csv`` and its ``config.json``. Torch-free, so a cached ONNX engine is found without PyTorch
(:mod:`deploy.engine`); reading the weights is :mod:`artifacts.checkpoint`'s business, checking that the pieces agree
:mod:`artifacts.model_folder`'s."""

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.config_file import CONFIG_FILE, SAFETENSORS_FILE, read_config
from artifacts.hub import resolve_hub_path
from data.class_mapping import CLASS_MAPPING_FILE
from errors import UserError

CHECKPOINT_FILE = "checkpoint.pth"  # the latest full training state
BEST_FILE = "model_best.pth"  # the best weights; published model folders call it best_checkpoint.pth
MODEL_FOLDER_FILES = (BEST_FILE, "best_checkpoint.pth", CHECKPOINT_FILE, SAFETENSORS_FILE)


@dataclass
class ModelSource:
    """Where a model's pieces are: the checkpoint file, its class mapping and its ``config.json`` (if any)."""

    checkpoint: Path
    class_csv: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex (what identifies a checkpoint in engine cache keys and galleries)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def find_checkpoint(path: str | os.PathLike, names: Sequence[str] = MODEL_FOLDER_FILES) -> Path:
    """``path`` itself when it is a file, else the first of ``names`` inside the folder ``path`` (a local path or an
    ``hf-hub:`` id)."""
    path = resolve_hub_path(path)
    if path.is_dir():
        found = next((path / name for name in names if (path / name).is_file()), None)
        if found is None:
            raise UserError(f"{path} is a folder without a checkpoint; expected one of {', '.join(names)}, "
                            "or pass the checkpoint file itself")
        return found
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path (a .pth file or a model folder)")
    return path


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
