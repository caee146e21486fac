"""A glance-and-focus model folder (``train_glance_focus.py``) behind the same API as every other artist model.

Per image it adds a ``glance_focus`` entry to the results: the focus steps used, the glance and crop boxes in
original-image pixels and the GFLOPs spent; the exit rule (``--exit-threshold`` or ``--budget``) and ``--save-crops``
come with :class:`FocusOptions`.
"""

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from artifacts.config_file import read_config
from data.images import ImageLoadError, load_image, to_rgb
from inference.results import BatchedModel, ImageInput, SkippedImage

if TYPE_CHECKING:  # gfnet (FLOP counting, crops) is imported only when such a folder is loaded
    from inference.glance_focus_predictor import GFPrediction, GlanceFocusPredictor


@dataclass(frozen=True)
class FocusOptions:
    """How a glance-and-focus model reads images: stop at a top probability (``exit_threshold``) or within an
    average ``budget`` of GFLOPs (calibrated thresholds), and where to draw the crops (``save_crops``)."""

    exit_threshold: float | None = None
    budget: float | None = None
    save_crops: str | os.PathLike | None = None


def is_glance_focus_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model folder written by ``train_glance_focus.py``."""
    path = Path(path)
    if not path.is_dir():
        return False
    config = read_config(path)
    return "gf" in config and str(config.get("model", "")).endswith("_gf")


class GlanceFocusModel(BatchedModel):
    """:class:`inference.results.BatchedModel` over a
    :class:`inference.glance_focus_predictor.GlanceFocusPredictor`, image by image."""

    def __init__(self, predictor: "GlanceFocusPredictor", folder: Path, options: FocusOptions):
        self.predictor, self.options = predictor, options
        self.class_names, self.config = predictor.classes, predictor.config
        self.model_name, self.checkpoint = str(self.config["model"]), predictor.weights or folder
        self.input_size = int(predictor.model.glance_size)
        self.data_config = predictor.data_config
        predictor.thresholds(options.exit_threshold, options.budget)  # a bad rule fails now, not at the first image
        self._details: dict[str, dict[str, Any]] = {}

    @property
    def feature_dim(self) -> int:
        return int(self.predictor.model.classifier.hidden_dim)

    def _predict(self, image: ImageInput, name: str) -> "GFPrediction":
        image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        prediction = self.predictor.predict(image, self.options.exit_threshold, self.options.budget)
        if self.options.save_crops is not None:
            self.predictor.save_crops(image, prediction, Path(self.options.save_crops) / Path(name).with_suffix(""))
        self._details[name] = {"glance_focus": {
            "steps": prediction.steps, "glance_box": prediction.glance_box, "boxes": prediction.boxes,
            "gflops": round(float(prediction.gflops), 6)}}
        return prediction

    def _batches(self, images: Sequence[ImageInput], names: Sequence[str], mode: str, batch_size: int,
                 num_workers: int, skipped: list[SkippedImage] | None,
                 progress: bool) -> Iterator[tuple[list[str], np.ndarray | None, np.ndarray | None]]:
        for image, name in zip(images, names, strict=True):
            try:
                prediction = self._predict(image, name)
            except ImageLoadError as err:
                if skipped is None:
                    raise
                skipped.append(SkippedImage(name, err.reason))
                print(f"warning: skipping {name} ({err.reason})", file=sys.stderr)
                continue
            style = prediction.style.numpy()[None].astype(np.float32)
            style /= max(float(np.linalg.norm(style)), 1e-12)
            probs = prediction.probs.numpy()[None].astype(np.float32)
            yield [name], None if mode == "classify" else style, None if mode == "cluster" else probs

    def _extras(self, names: list[str]) -> list[dict[str, Any]]:
        return [self._details.pop(name) for name in names]


def load_glance_focus_model(folder: str | os.PathLike, device: Any = None,
                            options: FocusOptions | None = None) -> GlanceFocusModel:
    """A glance-and-focus model folder ready for :mod:`predictor`'s API."""
    from inference.glance_focus_predictor import load_glance_focus

    return GlanceFocusModel(load_glance_focus(folder, device), Path(folder), options or FocusOptions())
