"""``config.json`` of a model folder as a file (reading and writing), and the names of the files a folder holds.

Torch-free, so the ONNX runtime path reads its folder without torch; what the keys mean and how a network is built
from them is :mod:`artifacts.model_folder`'s business (:func:`artifacts.model_folder.build_config`).
"""

import json
import os
from pathlib import Path
from typing import Any

from errors import UserError

CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"  # an exported model (python export.py); run with onnxruntime
SAFETENSORS_FILE = "model.safetensors"  # weights only, no pickle (python export.py --format safetensors)
REFERENCE_FILE = "reference.json"  # probe inputs and outputs an exported model's runtime can check itself with


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as indented UTF-8 JSON through a temporary file renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_config(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``config.json`` (from :func:`artifacts.model_folder.build_config`) into ``folder``."""
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
