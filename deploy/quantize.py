"""int8 static quantization of an exported model with onnxruntime (QDQ, per-channel weights), and what it costs.

Calibrated on a folder of images preprocessed exactly as inference does; reports the speed-up over fp32 and the
top-1 agreement with fp32 on those images, so the user decides whether the int8 file is worth shipping.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.onnx_model import OnnxModel, normalize_uint8
from inference.results import list_images
from utils import UserError

INT8_FILE = "model.int8.onnx"


@dataclass
class Int8Report:
    """fp32 vs int8 on the calibration images: seconds per batch each and top-1 agreement."""

    images: int
    fp32_seconds: float
    int8_seconds: float
    top1_agreement: float

    def line(self) -> str:
        return (f"int8 on {self.images} calibration images: {self.fp32_seconds / self.int8_seconds:.2f}x the fp32 "
                f"speed ({self.int8_seconds * 1000:.1f} vs {self.fp32_seconds * 1000:.1f} ms per batch), top-1 "
                f"agreement with fp32 {self.top1_agreement:.1%}")


def calibration_batch(model: OnnxModel, folder: Path, limit: int = 64) -> np.ndarray:
    """Up to ``limit`` images of ``folder`` preprocessed and normalised as inference does: float32 NCHW."""
    if not folder.is_dir():
        raise UserError(f"calibration folder not found: {folder}; pass --calibration-dir with some images")
    names = list_images(folder)[:limit]
    paths = [folder / name for name in names]
    batches = [batch for _, batch in model.decoded_batches(paths, names, 16, 2, [], False)]
    if not batches:
        raise UserError(f"no readable images in {folder}; --calibration-dir needs a few dozen typical images")
    return normalize_uint8(np.concatenate(batches), model.data_config["mean"], model.data_config["std"])


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over one image at a time."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.items = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def quantize_int8(fp32_path: Path, int8_path: Path, images: np.ndarray, input_name: str) -> None:
    """Static QDQ quantization: int8 per-channel weights, uint8 activations calibrated on ``images``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_name(f".{int8_path.stem}.pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), _Reader(input_name, images), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def _seconds_per_batch(session: Any, input_name: str, batch: np.ndarray, repeats: int = 3) -> float:
    session.run(None, {input_name: batch})  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {input_name: batch})
    return (time.perf_counter() - start) / repeats


def compare_int8(fp32: Any, int8: Any, input_name: str, images: np.ndarray) -> Int8Report:
    """Speed (one batch of all ``images``) and top-1 agreement of the int8 session against the fp32 one."""
    top1 = [session.run(["logits"], {input_name: images})[0].argmax(1) for session in (fp32, int8)]
    return Int8Report(len(images), _seconds_per_batch(fp32, input_name, images),
                      _seconds_per_batch(int8, input_name, images), float((top1[0] == top1[1]).mean()))
