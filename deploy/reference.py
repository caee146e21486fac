"""``reference.json`` of an exported ONNX folder: probe inputs and the outputs onnxruntime gave for them at export,
and the names and tolerance they are checked with. Torch-free: a cached ONNX engine is checked without PyTorch."""

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.config_file import write_json_atomic

INPUT_NAME, OUTPUT_NAMES = "input", ("logits", "features", "texture")
FP32_RTOL = 1e-4  # max |onnx - torch| / max |torch| per output


def write_reference(path: Path, inputs: np.ndarray, session: Any) -> None:
    """``reference.json``: the probe inputs (base64 float32, NCHW) and onnxruntime's outputs for them."""
    outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs})
    write_json_atomic(path, {
        "description": "probe inputs (already normalised) and the expected outputs; a runtime matches within rel 1e-4",
        "input_name": INPUT_NAME, "input_shape": list(inputs.shape), "input_dtype": "float32",
        "input_base64": base64.b64encode(inputs.astype("<f4").tobytes()).decode("ascii"),
        "outputs": {name: value.tolist() for name, value in zip(OUTPUT_NAMES, outputs, strict=True)},
        "tolerance": {"max_rel": FP32_RTOL},
    })


def read_reference(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The probe inputs and expected outputs of a ``reference.json``."""
    ref = json.loads(path.read_text(encoding="utf-8"))
    inputs = np.frombuffer(base64.b64decode(ref["input_base64"]), "<f4").reshape(ref["input_shape"])
    return inputs, {name: np.asarray(value, np.float32) for name, value in ref["outputs"].items()}
