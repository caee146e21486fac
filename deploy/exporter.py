"""Export a model folder or checkpoint into a self-contained deployment folder (ONNX and/or safetensors), verified.

An ONNX folder holds ``model.onnx``, ``config.json`` (:func:`artifacts.model_folder.build_export_config`),
``class_mapping.csv`` and ``reference.json``; a safetensors folder ``model.safetensors`` with the same
``config.json`` and ``class_mapping.csv``. ``--int8`` adds ``int8/``, a complete folder around the quantized model.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from artifacts.checkpoint import save_safetensors
from artifacts.config_file import CONFIG_FILE, ONNX_FILE, REFERENCE_FILE, SAFETENSORS_FILE, write_config
from artifacts.model_folder import ModelSpec, build_export_config
from artifacts.outputs import prepare_output_dir
from data.class_mapping import CLASS_MAPPING_FILE, write_class_mapping
from deploy.export_onnx import (
    FP32_RTOL,
    INPUT_NAME,
    OUTPUT_NAMES,
    PROBE_COUNT,
    Comparison,
    compare,
    export_onnx,
    export_ready,
    probe_inputs,
    write_reference,
)
from deploy.quantize import calibration_batch, compare_int8, quantize_int8
from inference.onnx_model import load_onnx_model
from utils import UserError

FORMATS = ("onnx", "safetensors", "both")
ONNX_LIMIT_BYTES = 2 * 1024**3  # protobuf's limit: larger weights go to an external data file


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


def _onnx_fields(options: ExportOptions) -> dict:
    return {"onnx": {"file": ONNX_FILE, "opset": options.opset, "dynamic_size": options.dynamic_size,
                     "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES), "exporter": f"torch {torch.__version__}",
                     "onnx": onnx.__version__, "verified_with": f"onnxruntime {onnxruntime.__version__}",
                     "reference": REFERENCE_FILE}}


def verify(path: Path, wrapper: nn.Module, size: int, config: dict, dynamic_size: bool) -> list[Comparison]:
    """onnxruntime vs PyTorch on the probe images and on random batches of other sizes (and another input size
    with ``dynamic_size``); a relative difference above :data:`FP32_RTOL` is a :class:`UserError`."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    checks = [("probe images", probe_inputs(PROBE_COUNT, size, config["mean"], config["std"])),
              ("random batch of 3", rng.standard_normal((3, 3, size, size), dtype=np.float32))]
    if dynamic_size:
        other = size + 32
        checks.append((f"random batch of 1 at {other} px", rng.standard_normal((1, 3, other, other), np.float32)))
    results = [compare(label, session, wrapper, inputs) for label, inputs in checks]
    for result in results:
        print(f"verify {result.line()}")
    worst = max(max(r.max_rel.values()) for r in results)
    if worst > FP32_RTOL:
        raise UserError(f"{path}: onnxruntime differs from PyTorch by rel {worst:.2e} (tolerance {FP32_RTOL:.0e}); "
                        "do not ship it: try another --opset or report the model")
    write_reference(path.with_name(REFERENCE_FILE), checks[0][1], session)
    return results


def _export_int8(folder: Path, calibration_dir: Path | None) -> None:
    if calibration_dir is None:
        raise UserError("--int8 needs --calibration-dir with a few dozen typical images")
    model = load_onnx_model(folder)
    images = calibration_batch(model, calibration_dir)
    int8_folder = prepare_output_dir(folder / "int8")
    quantize_int8(folder / ONNX_FILE, int8_folder / ONNX_FILE, images, INPUT_NAME)
    for name in (CONFIG_FILE, CLASS_MAPPING_FILE):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, int8_folder / name)
    int8 = load_onnx_model(int8_folder)
    print(compare_int8(model.session, int8.session, INPUT_NAME, images).line())
    print(f"int8 model folder: {int8_folder} (ships only if these numbers suit you; see docs/deployment.md)")


def _write_onnx(net: nn.Module, spec: ModelSpec, folder: Path, size: int, options: ExportOptions) -> dict:
    wrapper = export_ready(net)
    path = folder / ONNX_FILE
    export_onnx(wrapper, path, size, options.opset, options.dynamic_size)
    if path.stat().st_size > ONNX_LIMIT_BYTES:
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location=f"{ONNX_FILE}.data")
    config = build_export_config(spec.name, net, size, spec.config, "onnx", ONNX_FILE, **_onnx_fields(options))
    verify(path, wrapper, size, config, options.dynamic_size)
    return config


def export_model(spec: ModelSpec, options: ExportOptions) -> Path:
    """Build ``spec``'s network and write the folder ``options`` ask for; returns the folder."""
    if options.file_format not in FORMATS:
        raise UserError(f"unknown format {options.file_format!r}; use one of {', '.join(FORMATS)}")
    folder = prepare_output_dir(options.output_dir)
    net = spec.build().eval()
    size = _input_size(spec, net, options.input_size)
    if spec.class_names is not None:
        write_class_mapping(folder / CLASS_MAPPING_FILE, spec.class_names)
    config = None
    if options.file_format in ("onnx", "both"):
        config = _write_onnx(net, spec, folder, size, options)
        print(f"wrote {folder / ONNX_FILE} (opset {options.opset}, "
              f"{'dynamic' if options.dynamic_size else size} px input) and {REFERENCE_FILE}")
    if options.file_format in ("safetensors", "both"):
        save_safetensors(net.state_dict(), folder / SAFETENSORS_FILE)
        config = (config or build_export_config(spec.name, net, size, spec.config, "safetensors", SAFETENSORS_FILE))
        config.update(format=options.file_format if options.file_format == "safetensors" else "onnx+safetensors",
                      checkpoint=SAFETENSORS_FILE)
        print(f"wrote {folder / SAFETENSORS_FILE}")
    write_config(folder, config)
    if options.int8:
        _export_int8(folder, options.calibration_dir)
    return folder
