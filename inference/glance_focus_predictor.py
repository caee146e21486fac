"""Inference on a glance-and-focus model folder: classes, style vectors, steps used, crop boxes, compute.

    gf = load_glance_focus("runs/gf", "cpu")
    pred = gf.predict("scan.png", exit_threshold=0.9)     # or budget=0.2 (GFLOPs, needs --calibrate-budget)
    pred.probs, pred.style, pred.steps, pred.boxes, pred.gflops
    gf.save_crops("scan.png", pred, "scan_crops.png")
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from artifacts.glance_focus_folder import load_model_folder, weights_file
from data.glance_views import View, make_view, to_original, to_tensor
from data.images import load_image
from inference.early_exit import NEVER, threshold_thresholds, thresholds_for_budget
from perf.glance_focus import cumulative_gflops
from utils import UserError, resolve_device

__all__ = ["GFPrediction", "GlanceFocusPredictor", "load_glance_focus"]

ImageInput = str | os.PathLike | Image.Image


@dataclass
class GFPrediction:
    """One image: class probabilities (K,) and style vector (D,) of the exit step, the focus steps used, the glance
    box and focus crop boxes in original-image pixels (x0, y0, x1, y1), and the GFLOPs spent."""

    probs: torch.Tensor
    style: torch.Tensor
    steps: int
    glance_box: list[int]
    boxes: list[list[int]]
    gflops: float


class GlanceFocusPredictor:
    """A loaded glance-and-focus model with its classes, ``config.json``, GFLOPs per step and exit rules."""

    def __init__(self, model, classes: list[str], config: dict[str, Any], device: torch.device,
                 weights: Path | None = None):
        self.model, self.classes, self.config, self.device = model, classes, config, device
        self.weights = weights  # the weights file it was loaded from
        self.gf = config["gf"]
        self.step_gflops: list[float] = self.gf["step_gflops"]
        self.cumulative_gflops = cumulative_gflops(self.step_gflops)
        size = int(model.glance_size)
        # The preprocessing of the style vectors (galleries record it): the glance's size and normalisation, and
        # where the crops come from.
        self.data_config = {"input_size": (3, size, size), "mean": tuple(config["mean"]), "std": tuple(config["std"]),
                            **{key: self.gf.get(key) for key in ("focus_resolution", "patch_size")}}

    def thresholds(self, exit_threshold: float | None = None, budget: float | None = None) -> list[float]:
        """Per-step exit thresholds: ``exit_threshold`` at every step, a calibrated ``budget``, or no early exit."""
        steps = self.model.focus_steps
        if exit_threshold is not None and budget is not None:
            raise UserError("pass either --exit-threshold or --budget, not both")
        if exit_threshold is not None:
            if not 0 < exit_threshold <= 1:
                raise UserError(f"--exit-threshold must be in (0, 1], got {exit_threshold}")
            return threshold_thresholds(steps, exit_threshold)
        if budget is not None:
            return thresholds_for_budget(self.gf.get("budget_table", []), budget)["thresholds"]
        return [NEVER] * steps + [0.0]

    def view(self, image: ImageInput) -> View:
        """The glance and (whole, non-square allowed) focus images of an image or image file."""
        image = image if isinstance(image, Image.Image) else load_image(image)
        return make_view(image, self.model.glance_size, self.model.focus_resolution)

    @torch.no_grad()
    def predict(self, image: ImageInput, exit_threshold: float | None = None, budget: float | None = None,
                policy: str = "learned") -> GFPrediction:
        """Glance, then focus steps until the exit rule is met (``policy``: ``learned`` or ``fallback``)."""
        thresholds = self.thresholds(exit_threshold, budget)
        view = self.view(image)
        mean, std = self.data_config["mean"], self.data_config["std"]
        glance = to_tensor(view.glance, mean, std)[None].to(self.device)
        focus = to_tensor(view.focus, mean, std)[None].to(self.device)
        boxes: list[torch.Tensor] = []
        for t, step in enumerate(self.model.iter_steps(glance, focus, policy=policy)):
            if step.box is not None:
                boxes.append(step.box[0])
            probs = step.logits.float().softmax(-1)[0]
            if probs.max().item() >= thresholds[t]:
                break
        width, height = view.original_size
        return GFPrediction(probs.cpu(), step.style[0].float().cpu(), t, [0, 0, width, height],
                            to_original(torch.stack(boxes), view) if boxes else [], self.cumulative_gflops[t])

    def classify(self, image: ImageInput, top_k: int = 5, **exit_rule: Any) -> list[tuple[str, float]]:
        """The ``top_k`` (class name, probability) pairs."""
        probs = self.predict(image, **exit_rule).probs
        values, indices = probs.topk(min(top_k, len(self.classes)))
        return [(self.classes[i], v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]

    def extract_features(self, image: ImageInput, **exit_rule: Any) -> torch.Tensor:
        """The style vector (the GRU state at the exit step), L2-normalised."""
        return torch.nn.functional.normalize(self.predict(image, **exit_rule).style, dim=0)

    def save_crops(self, image: ImageInput, prediction: GFPrediction, path: str | os.PathLike) -> Path:
        """Write ``image`` as a PNG with the glance box (blue) and the numbered focus boxes (red) drawn."""
        image = (image if isinstance(image, Image.Image) else load_image(image)).copy()
        draw = ImageDraw.Draw(image)
        width = max(2, min(image.size) // 200)
        x0, y0, x1, y1 = prediction.glance_box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 90, 255), width=width)
        for i, (x0, y0, x1, y1) in enumerate(prediction.boxes, start=1):
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 30, 30), width=width)
            draw.text((x0 + 2 * width, y0 + 2 * width), str(i), fill=(255, 30, 30))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path.with_suffix(".png"))
        return path.with_suffix(".png")


def load_glance_focus(folder: str | os.PathLike, device: str | torch.device | None = None) -> GlanceFocusPredictor:
    """Load a glance-and-focus model folder written by ``train_glance_focus.py``."""
    device = resolve_device(device)
    model, classes, config = load_model_folder(folder, device)
    return GlanceFocusPredictor(model, classes, config, device, weights_file(folder, config))
