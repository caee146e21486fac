"""Export a model folder or checkpoint into a self-contained deployment folder (ONNX and/or safetensors), verified.

An ONNX folder holds ``model.onnx``, ``config.json`` (:func:`artifacts.model_folder.build_export_config`),
``class_mapping.csv`` and ``reference.json`` (:mod:`deploy.onnx_folder`); a safetensors folder ``model.safetensors``
with the same ``config.json`` and ``class_mapping.csv``. ``--int8`` adds ``int8/``, a complete folder around the
quantized model. A safetensors-only export needs neither onnx nor onnxruntime.
"""

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from artifacts.checkpoint import save_safetensors
from artifacts.config_file import ONNX_FILE, REFERENCE_FILE, SAFETENSORS_FILE, write_config
from artifacts.model_folder import ModelSpec, build_export_config
from artifacts.outputs import prepare_output_dir
from data.class_mapping import CLASS_MAPPING_FILE, write_class_mapping
from errors import import_optional
from utils import UserError

FORMATS = ("onnx", "safetensors", "both")


@dataclass
class ExportOptions:
    """What ``export.py`` was asked for (see its flags)."""

    output_dir: Path
    input_size: int | None = None
    opset: int = 18
    dynamic_size: bool = False
    file_format: str = "onnx"
    int8: bool = False
    calibration_dir: Path | None = None


def _input_size(spec: ModelSpec, net: nn.Module, requested: int | None) -> int:
    size = requested or spec.input_size or int(net.pretrained_cfg["input_size"][-1])
    if size < 32:
        raise UserError(f"input size {size} is too small (at least 32 px); pass --input-size")
    return size


def export_model(spec: ModelSpec, options: ExportOptions) -> Path:
    """Build ``spec``'s network and write the folder ``options`` ask for; returns the folder."""
    if options.file_format not in FORMATS:
        raise UserError(f"unknown format {options.file_format!r}; use one of {', '.join(FORMATS)}")
    onnx_folder = None  # imported first: a missing onnx/onnxruntime is reported before anything is written
    if options.file_format in ("onnx", "both"):
        onnx_folder = import_optional("deploy.onnx_folder", "requirements-deploy.txt", "ONNX export")
    folder = prepare_output_dir(options.output_dir)
    net = spec.build().eval()
    size = _input_size(spec, net, options.input_size)
    if spec.class_names is not None:
        write_class_mapping(folder / CLASS_MAPPING_FILE, spec.class_names)
    config = None
    if onnx_folder is not None:
        config = onnx_folder.write_onnx(net, spec, folder, size, options)
        print(f"wrote {folder / ONNX_FILE} (opset {options.opset}, "
              f"{'dynamic' if options.dynamic_size else size} px input) and {REFERENCE_FILE}")
    if options.file_format in ("safetensors", "both"):
        save_safetensors(net.state_dict(), folder / SAFETENSORS_FILE)
        config = (config or build_export_config(spec.name, net, size, spec.config, "safetensors", SAFETENSORS_FILE))
        config.update(format=options.file_format if options.file_format == "safetensors" else "onnx+safetensors",
                      checkpoint=SAFETENSORS_FILE)
        print(f"wrote {folder / SAFETENSORS_FILE}")
    write_config(folder, config)
    if options.int8 and onnx_folder is not None:
        onnx_folder.export_int8(folder, options.calibration_dir)
    return folder
