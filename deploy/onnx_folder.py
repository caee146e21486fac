"""The ONNX half of an export: ``model.onnx`` written, verified against PyTorch with onnxruntime, ``reference.json``,
and the optional ``int8/`` folder. Imported only when ONNX is asked for (onnx and onnxruntime are optional)."""

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from artifacts.config_file import CONFIG_FILE, ONNX_FILE, REFERENCE_FILE
from artifacts.model_folder import ModelSpec, build_export_config
from artifacts.outputs import prepare_output_dir
from data.class_mapping import CLASS_MAPPING_FILE
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

if TYPE_CHECKING:
    from deploy.exporter import ExportOptions

ONNX_LIMIT_BYTES = 2 * 1024**3  # protobuf's limit: larger weights go to an external data file


def _onnx_fields(options: "ExportOptions") -> dict:
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


def export_int8(folder: Path, calibration_dir: Path | None) -> None:
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


def write_onnx(net: nn.Module, spec: ModelSpec, folder: Path, size: int, options: "ExportOptions") -> dict:
    wrapper = export_ready(net)
    path = folder / ONNX_FILE
    export_onnx(wrapper, path, size, options.opset, options.dynamic_size)
    if path.stat().st_size > ONNX_LIMIT_BYTES:
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location=f"{ONNX_FILE}.data")
    config = build_export_config(spec.name, net, size, spec.config, "onnx", ONNX_FILE, **_onnx_fields(options))
    verify(path, wrapper, size, config, options.dynamic_size)
    return config
