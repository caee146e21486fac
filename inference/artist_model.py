"""A loaded artist model: classify images and extract style features, one image or many (batched)."""

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from data.transforms import normalize_batch
from inference.batching import ImageInput, SkippedImage, list_images, run_batched, split_line_breaks
from inference.compiled import PaddedCompiledModel
from utils import UserError

MODES = ("classify", "cluster", "both")


@dataclass
class BatchResult:
    """Results of a run over many files: row ``i`` of ``features`` and ``classifications[i]`` belong to ``names[i]``."""

    names: list[str]
    classifications: list[list[dict[str, Any]]] | None
    features: np.ndarray | None
    skipped: list[SkippedImage]

    def entries(self, include_features: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(name, {"classification": [...], "features": [...]})`` per image, JSON-ready."""
        for i, name in enumerate(self.names):
            entry: dict[str, Any] = {}
            if self.classifications is not None:
                entry["classification"] = self.classifications[i]
            if self.features is not None and include_features:
                entry["features"] = self.features[i].tolist()
            yield name, entry

    def predictions(self) -> list[dict[str, Any]]:
        """Per image ``{"classification": [...], "features": np.ndarray}`` (the parts the run computed)."""
        outputs = []
        for i in range(len(self.names)):
            output: dict[str, Any] = {}
            if self.classifications is not None:
                output["classification"] = self.classifications[i]
            if self.features is not None:
                output["features"] = self.features[i]
            outputs.append(output)
        return outputs


def _check_run_args(top_k: int, threshold: float, batch_size: int, num_workers: int) -> None:
    for label, value, minimum in (("top-k", top_k, 1), ("batch size", batch_size, 1), ("workers", num_workers, 0)):
        if value < minimum:
            raise UserError(f"{label} must be at least {minimum}, got {value}")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"threshold is a probability between 0 and 1, got {threshold}")


def _require_finite(output: Any, checkpoint: Path | None, amp: bool) -> None:
    """Refuse a model whose outputs are NaN or infinite (a diverged training run) before it writes any result."""
    tensors = output if isinstance(output, tuple) else (output,)
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return
    hint = "run without --amp, or use" if amp else "use"
    raise UserError(f"{checkpoint or 'the model'} gives NaN or infinite outputs on the first batch (its training "
                    f"diverged?); {hint} an earlier checkpoint of the run")


def top_k_classes(probs: torch.Tensor, class_names: list[str], top_k: int,
                  threshold: float) -> list[list[dict[str, Any]]]:
    """Per row: the ``top_k`` most probable ``{"class_id", "class_name", "probability"}`` at or above ``threshold``
    (a NaN probability is kept, so its image shows up as non-finite instead of as "no class")."""
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [
        [{"class_id": i, "class_name": class_names[i], "probability": p}
         for p, i in zip(row_values, row_indices, strict=True) if p >= threshold or math.isnan(p)]
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
    ]


class ArtistModel:
    """A loaded artist model with its preprocessing and class names. Build it with :func:`load_model_bundle`.

    Methods take one image (PIL image, path or file object) and return one result, or a list of images and
    return a list (or, for features, an ``(N, feature_dim)`` array). Built directly, ``model`` must already be
    in eval mode on ``device`` (fused or not) and ``transform`` its eval preprocessing (uint8 output is normalised
    with ``data_config``'s ``mean``/``std``, float output is used as it is). ``config`` is the training
    ``config.json`` (e.g. ``multi_label``: trained with sigmoid outputs). With ``compile``, batches run through
    :class:`inference.compiled.PaddedCompiledModel`. A model whose first outputs are not finite is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        class_names: list[str] | None = None,
        *,
        device: torch.device | str = "cpu",
        amp: bool = False,
        model_name: str | None = None,
        data_config: dict[str, Any] | None = None,
        checkpoint: Path | None = None,
        config: dict[str, Any] | None = None,
        compile: bool = False,
    ):
        self.model = model
        self.transform = transform
        self.class_names = class_names
        self.device = torch.device(device)
        self.amp = amp
        self.model_name = model_name
        self.data_config = data_config or {}
        self.checkpoint = checkpoint
        self.config = config or {}
        self._compiled = PaddedCompiledModel(model) if compile else None
        self._outputs_checked = False  # whether a first batch showed finite outputs

    @property
    def input_size(self) -> int:
        return int(self.data_config.get("input_size", (3, 224, 224))[-1])

    @property
    def feature_dim(self) -> int:
        """Size of the style feature vector (the one place that reads the network's attribute)."""
        return int(self.model.head_hidden_size)

    def autocast(self) -> torch.autocast:
        """The model's mixed-precision context: float16 on CUDA, bfloat16 on the CPU; a no-op unless ``amp``."""
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp)

    def run_model(self, batch: torch.Tensor, batch_size: int | None = None, **kwargs: Any) -> Any:
        """The model's output for a batch of :attr:`transform` outputs already on :attr:`device`: normalised,
        under :meth:`autocast`, compiled when built with ``compile``. Call it under ``torch.inference_mode()``.

        ``batch_size`` is the run's batch size: a compiled model pads smaller batches to it, so it compiles once per
        batch size (default: pad to the largest batch so far). The first batch's outputs must be finite.
        """
        batch = normalize_batch(batch, self.data_config.get("mean", IMAGENET_DEFAULT_MEAN),
                                self.data_config.get("std", IMAGENET_DEFAULT_STD))
        with self.autocast():
            if self._compiled is None:
                output = self.model(batch, **kwargs)
            else:
                output = self._compiled(batch, batch_size or 0, **kwargs)
        if not self._outputs_checked:
            _require_finite(output, self.checkpoint, self.amp)
            self._outputs_checked = True
        return output

    def _compute(self, mode: str,
                 batch_size: int) -> Callable[[torch.Tensor], tuple[np.ndarray | None, torch.Tensor | None]]:
        """The per-batch computation of ``mode``: (features as float32 numpy or None, probabilities or None)."""
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "cluster" and self.class_names is None:
            raise UserError("classification needs the class names: pass the class_mapping.csv from training "
                            "(--class-csv), or use --mode cluster")

        def compute(batch: torch.Tensor) -> tuple[np.ndarray | None, torch.Tensor | None]:
            if mode == "cluster":
                features, logits = self.run_model(batch, batch_size, return_features=True), None
            else:
                features, logits = self.run_model(batch, batch_size, return_both=True)
            probs = None if logits is None else self._probabilities(logits.float()).cpu()
            features = None if mode == "classify" else features.float().cpu().numpy()
            return features, probs

        return compute

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes; independent sigmoids for a multi-label model (``multi_label`` in its config)."""
        return logits.sigmoid() if self.config.get("multi_label") else logits.softmax(dim=1)

    def run_paths(
        self,
        images: Sequence[ImageInput],
        mode: str = "classify",
        *,
        names: Sequence[str] | None = None,
        top_k: int = 5,
        threshold: float = 0.0,
        batch_size: int = 32,
        num_workers: int = 0,
        skip_unreadable: bool = True,
        progress: bool = False,
    ) -> BatchResult:
        """Classify and/or extract features (``mode``: classify, cluster or both) for many images, batched.

        Unreadable files are skipped (listed in the result's ``skipped``) unless ``skip_unreadable`` is False,
        then they raise :class:`data.images.ImageLoadError`.
        """
        _check_run_args(top_k, threshold, batch_size, num_workers)
        compute = self._compute(mode, min(batch_size, len(images)))
        skipped: list[SkippedImage] | None = [] if skip_unreadable else None
        kept: list[str] = []
        classifications: list[list[dict[str, Any]]] = []
        features: list[np.ndarray] = []
        for batch_names, (batch_features, probs) in run_batched(
            compute, images, self.transform, names=names, batch_size=batch_size, num_workers=num_workers,
            device=self.device, skipped=skipped, progress=progress, desc=mode,
        ):
            kept.extend(batch_names)
            if probs is not None:
                classifications.extend(top_k_classes(probs, self.class_names, top_k, threshold))
            if batch_features is not None:
                features.append(batch_features)
        all_features = None
        if mode != "classify":
            all_features = np.concatenate(features) if features else np.zeros((0, self.feature_dim), np.float32)
        return BatchResult(kept, classifications if mode != "cluster" else None, all_features, skipped or [])

    def run_directory(
        self,
        input_dir: str | os.PathLike,
        mode: str = "classify",
        *,
        recursive: bool = True,
        top_k: int = 5,
        threshold: float = 0.0,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = False,
    ) -> BatchResult:
        """:meth:`run_paths` over the images of a directory; names are paths relative to ``input_dir``."""
        names = list_images(input_dir, recursive)
        if not names:
            hint = "" if recursive else " (sub-folders were not searched: drop --no-recursive)"
            raise UserError(f"no image files in {input_dir}{hint}; image files end in .jpg, .png, .webp, ...")
        names, bad_names = split_line_breaks(names)
        paths = [os.path.join(input_dir, name) for name in names]
        result = self.run_paths(paths, mode, names=names, top_k=top_k, threshold=threshold, batch_size=batch_size,
                                num_workers=num_workers, progress=progress)
        result.skipped[:0] = bad_names
        return result

    def _run_inputs(self, images: ImageInput | Sequence[ImageInput], mode: str,
                    **options: Any) -> tuple[bool, BatchResult]:
        """Run one image or a list of images (raising on unreadable ones); also says whether it was one image."""
        single = not isinstance(images, (list, tuple))
        return single, self.run_paths([images] if single else images, mode, skip_unreadable=False, **options)

    def predict(self, images: ImageInput | Sequence[ImageInput], mode: str = "classify", top_k: int = 5,
                threshold: float = 0.0, batch_size: int = 32) -> dict[str, Any] | list[dict[str, Any]]:
        """``{"classification": [...], "features": np.ndarray}`` (per ``mode``) for an image or a list of images.

        Raises:
            data.images.ImageLoadError: an image cannot be read.
        """
        single, result = self._run_inputs(images, mode, top_k=top_k, threshold=threshold, batch_size=batch_size)
        outputs = result.predictions()
        return outputs[0] if single else outputs

    def classify(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, threshold: float = 0.0, batch_size: int = 32
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Top-k ``{"class_id", "class_name", "probability"}`` (most likely first, probability >= threshold).

        One list for one image, a list of lists for a list of images.
        """
        single, result = self._run_inputs(images, "classify", top_k=top_k, threshold=threshold, batch_size=batch_size)
        return result.classifications[0] if single else result.classifications

    def extract_features(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Style feature vectors (float32): ``(feature_dim,)`` for one image, ``(N, feature_dim)`` for a list."""
        single, result = self._run_inputs(images, "cluster", batch_size=batch_size)
        return result.features[0] if single else result.features
