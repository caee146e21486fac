"""ONNX export of an artist model with standard operators, and its check against PyTorch with onnxruntime.

The graph: BatchNorm fused (``model.fuse()``), SKA as pad/slice/mul/add (``SKA(impl="plain")``), one input ``input``
(N, 3, H, W) normalised float32, three outputs ``logits``, ``features`` (the pooled style vector) and ``texture`` (the
texture style vector, ``LSNet.forward_texture``), a dynamic batch axis and, with ``dynamic_size``, dynamic height and
width (the attention biases are resized in the graph).
"""

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy.reference import INPUT_NAME, OUTPUT_NAMES
from model.lsnet import TEXTURE_STAGES, Attention, relative_offset_index, texture_statistics
from model.ska import SKA
from utils import UserError

PROBE_COUNT = 2


class ExportedOutputs(nn.Module):
    """``(logits, features, texture)`` of an LSNet in one pass: ``forward_head`` on the last map with and without
    ``pre_logits``, and :func:`model.lsnet.texture_statistics` of the first three stages' maps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last, maps = self.net.forward_intermediates(x, list(TEXTURE_STAGES))
        return self.net.forward_head(last), self.net.forward_head(last, pre_logits=True), texture_statistics(maps)


def export_ready(net: nn.Module) -> ExportedOutputs:
    """A fused eval-mode copy of ``net`` with every SKA on its plain (standard operator) path."""
    net = copy.deepcopy(net).eval()
    net.fuse()
    for module in net.modules():
        if isinstance(module, SKA):
            module.impl = "plain"
    return ExportedOutputs(net).eval()


def _attention_grids(wrapper: ExportedOutputs, size: int) -> list[tuple[int, int, int]]:
    """(grid height, grid width, stored resolution) of every attention layer at a ``size`` input."""
    seen: list[tuple[int, int, int]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((*a[0].shape[-2:], m.resolution)))
             for m in wrapper.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        wrapper(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return seen


def trace_size(wrapper: ExportedOutputs, input_size: int) -> int:
    """An input size at which no attention grid equals its stored resolution, so the traced graph holds the general
    (resized bias) path for every size; at the stored size that path gives the stored table exactly."""
    for size in range(input_size, input_size + 8 * 64, 32):
        if all((h, w) != (r, r) for h, w, r in _attention_grids(wrapper, size)):
            return size
    raise UserError(f"found no trace size near {input_size} for a dynamic-size export; export without --dynamic-size")


def ignore_harmless_export_warnings() -> None:
    """Silence the exporter's warnings that are expected here: the tracer reading Python values of the kernel size
    (SKA) and of the attention grid (the branch taken at the traced size is the intended one: see
    :func:`trace_size`), and constant folding skipping the Slice nodes of SKA's padding (the graph stays correct)."""
    warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning,
                            r"model\.(ska|lsnet)$")
    warnings.filterwarnings("ignore", "Constant folding - Only steps=1 can be constant folded", UserWarning)


def export_onnx(wrapper: ExportedOutputs, path: Path, input_size: int, opset: int, dynamic_size: bool) -> None:
    """Write ``wrapper`` as an ONNX graph (weights embedded) with a dynamic batch axis (and H/W with
    ``dynamic_size``), using PyTorch's TorchScript-based exporter."""
    size = trace_size(wrapper, input_size) if dynamic_size else input_size
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    relative_offset_index.cache_clear()  # a cached index would be recorded as a constant of one size
    try:
        with warnings.catch_warnings():
            ignore_harmless_export_warnings()
            torch.onnx.export(
                wrapper, (torch.zeros(2, 3, size, size),), str(path), input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=False,
                dynamic_axes={INPUT_NAME: axes, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
            )
    except (RuntimeError, ValueError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"ONNX export failed at opset {opset} ({detail}); try another --opset") from None
    finally:
        relative_offset_index.cache_clear()


def probe_inputs(count: int, size: int, mean: list[float], std: list[float], seed: int = 0) -> np.ndarray:
    """``count`` deterministic normalised images (N, 3, size, size) float32: smooth colour gradients with stripes."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    images = []
    for n in range(count):
        phase = np.random.default_rng(seed + n).uniform(0, 2 * np.pi, 3)
        channels = [0.5 + 0.5 * np.sin(2 * np.pi * (n + 1) * (rows + c * cols) + phase[c]) for c in range(3)]
        images.append(np.stack(channels))
    pixels = np.round(np.stack(images) * 255) / 255
    mean_a, std_a = np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return ((pixels - mean_a) / std_a).astype(np.float32)


@dataclass
class Comparison:
    """How far onnxruntime's outputs are from PyTorch's on one batch."""

    label: str
    max_abs: dict[str, float]
    max_rel: dict[str, float]
    top5_agreement: float

    def line(self) -> str:
        diffs = ", ".join(f"{name} abs {self.max_abs[name]:.2e} rel {self.max_rel[name]:.2e}" for name in OUTPUT_NAMES)
        return f"{self.label}: {diffs}, top-5 agreement {self.top5_agreement:.0%}"


def compare(label: str, session: Any, wrapper: ExportedOutputs, inputs: np.ndarray) -> Comparison:
    """Run ``inputs`` through onnxruntime and PyTorch; max abs and relative (to the largest reference value)
    differences per output, and the share of rows with the same top-5 classes in the same order."""
    ours = session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs})
    with torch.no_grad():
        reference = [t.numpy() for t in wrapper(torch.from_numpy(inputs))]
    max_abs, max_rel = {}, {}
    for name, got, want in zip(OUTPUT_NAMES, ours, reference, strict=True):
        max_abs[name] = float(np.abs(got - want).max())
        max_rel[name] = max_abs[name] / max(float(np.abs(want).max()), 1e-12)
    k = min(5, reference[0].shape[1])
    same = np.argsort(-ours[0], axis=1)[:, :k] == np.argsort(-reference[0], axis=1)[:, :k]
    return Comparison(label, max_abs, max_rel, float(same.all(axis=1).mean()))
