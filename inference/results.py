"""The torch-free parts of inference: inputs, skipped files, image listing, top-k classes and the result of a run.

Shared by the PyTorch model (:mod:`inference.artist_model`) and the ONNX one (:mod:`inference.onnx_model`), which
imports neither torch nor timm.
"""

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from artifacts.work_folder import file_identity
from data.images import ImageLoadError, is_image_file
from data.scan import walk_files
from errors import UserError

ImageInput = Image.Image | str | os.PathLike | BinaryIO
MODES = ("classify", "cluster", "both")
# Which style vector features and galleries use: "pooled" is the classifier head's input (global average of the last
# stage, projected with --feature-dim), "texture" the channel spreads of the first three stages (LSNet.forward_texture).
DESCRIPTORS = ("pooled", "texture")


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be read: its name (relative path) and the loader's reason."""

    path: str
    reason: str


def report_skipped(batch_skipped: Sequence[SkippedImage], skipped: list[SkippedImage] | None,
                   warn: Callable[[str], None]) -> None:
    """A batch's unreadable images: added to ``skipped`` with one ``warn`` line each, or, without a list to collect
    them, :class:`data.images.ImageLoadError` for the first."""
    for item in batch_skipped:
        if skipped is None:
            raise ImageLoadError(item.path, item.reason)
        skipped.append(item)
        warn(f"warning: skipping {item.path} ({item.reason})")


@dataclass
class BatchResult:
    """Results of a run over many files: row ``i`` of ``features`` and ``classifications[i]`` belong to ``names[i]``."""

    names: list[str]
    classifications: list[list[dict[str, Any]]] | None
    features: np.ndarray | None
    skipped: list[SkippedImage]
    # Per image, further JSON-ready entries of the model kind (a glance-and-focus model: steps, crop boxes, GFLOPs).
    extras: list[dict[str, Any]] | None = None

    def entries(self, include_features: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(name, {"classification": [...], "features": [...], ...extras})`` per image, JSON-ready."""
        for i, name in enumerate(self.names):
            entry: dict[str, Any] = dict(self.extras[i]) if self.extras is not None else {}
            if self.classifications is not None:
                entry["classification"] = self.classifications[i]
            if self.features is not None and include_features:
                entry["features"] = self.features[i].tolist()
            yield name, entry

    def predictions(self) -> list[dict[str, Any]]:
        """Per image ``{"classification": [...], "features": np.ndarray}`` (the parts the run computed)."""
        outputs = []
        for i in range(len(self.names)):
            output: dict[str, Any] = dict(self.extras[i]) if self.extras is not None else {}
            if self.classifications is not None:
                output["classification"] = self.classifications[i]
            if self.features is not None:
                output["features"] = self.features[i]
            outputs.append(output)
        return outputs


def check_run_args(top_k: int, threshold: float, batch_size: int, num_workers: int) -> None:
    for label, value, minimum in (("top-k", top_k, 1), ("batch size", batch_size, 1), ("workers", num_workers, 0)):
        if value < minimum:
            raise UserError(f"{label} must be at least {minimum}, got {value}")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"threshold is a probability between 0 and 1, got {threshold}")


def top_k_classes(probs: np.ndarray, class_names: list[str], top_k: int,
                  threshold: float) -> list[list[dict[str, Any]]]:
    """Per row of ``probs`` (N, C): the ``top_k`` most probable ``{"class_id", "class_name", "probability"}`` at or
    above ``threshold``, most probable first (a NaN probability is kept, so its image shows up as non-finite instead
    of as "no class")."""
    k = min(top_k, probs.shape[1])
    order = np.argsort(-np.nan_to_num(probs, nan=np.inf), axis=1, kind="stable")[:, :k]
    return [
        [{"class_id": int(i), "class_name": class_names[i], "probability": p}
         for p, i in zip(row[indices].tolist(), indices.tolist(), strict=True) if p >= threshold or math.isnan(p)]
        for row, indices in zip(probs, order, strict=True)
    ]


def select_labels(confidences: np.ndarray, class_names: list[str], top_k: int, threshold: float,
                  normalize_ratio: bool) -> list[dict[str, Any]]:
    """The ``{"label", "confidence"[, "ratio"]}`` of one image's top-k labels at or above ``threshold`` (a NaN
    confidence is kept, so its image shows up as non-finite instead of as "no label")."""
    kept = [{"label": entry["class_name"], "confidence": entry["probability"]}
            for entry in top_k_classes(confidences[None], class_names, top_k, threshold)[0]]
    if normalize_ratio:
        total = sum(entry["confidence"] for entry in kept)
        for entry in kept:
            entry["ratio"] = entry["confidence"] / total
    return kept


def list_images(input_dir: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files (by extension) under ``input_dir`` as sorted relative paths with forward slashes.

    Hidden folders are left out; other files are ignored. Relative paths keep equal file names in different
    sub-folders apart.
    """
    root = Path(input_dir)
    return sorted(path.relative_to(root).as_posix() for path in walk_files(root, recursive) if is_image_file(path))


def split_line_breaks(names: list[str]) -> tuple[list[str], list[SkippedImage]]:
    """``names`` without those holding a line break (which would shift the lines of ``image_names.txt`` against
    the feature rows), and those as skipped images, warned about on stderr."""
    bad = [SkippedImage(name, "file name holds a line break; rename the file") for name in names
           if "\n" in name or "\r" in name]
    for item in bad:
        print(f"warning: skipping {item.path!r} ({item.reason})", file=sys.stderr)
    return [name for name in names if "\n" not in name and "\r" not in name], bad


def directory_images(input_dir: str | os.PathLike, recursive: bool = True) -> tuple[list[str], list[SkippedImage]]:
    """The sorted image names of a directory run (:func:`list_images`) and those skipped for a line break in their
    name (:func:`split_line_breaks`); a directory without images is a :class:`UserError`."""
    names = list_images(input_dir, recursive)
    if not names:
        hint = "" if recursive else " (sub-folders were not searched: drop --no-recursive)"
        raise UserError(f"no image files in {input_dir}{hint}; image files end in .jpg, .png, .webp, ...")
    return split_line_breaks(names)


class JoinedPaths(Sequence[str]):
    """``os.path.join(root, name)`` for each of ``names``, made when read: no second list of a million paths."""

    def __init__(self, root: str | os.PathLike, names: Sequence[str]):
        self.root, self.names = os.fspath(root), names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int | slice) -> "str | JoinedPaths":
        if isinstance(index, slice):
            return JoinedPaths(self.root, self.names[index])
        return os.path.join(self.root, self.names[index])


class BatchedModel:
    """The public API of a loaded artist model, whatever runs it (PyTorch or onnxruntime): one image or many.

    Subclasses set ``class_names``, ``config`` (the model folder's ``config.json``) and :attr:`feature_dim`, and
    implement :meth:`_batches`, the per-batch computation over decoded, preprocessed images.
    """

    class_names: list[str] | None
    config: dict[str, Any]
    checkpoint: Any  # the weights file (or exported model) it was loaded from
    descriptor: str = "pooled"
    lanes: int = 1  # batches it can run at once from different threads (onnxruntime: inference.threads.onnx_lanes)

    @property
    def descriptors(self) -> tuple[str, ...]:
        """The style vectors this model computes (PyTorch LSNet models add "texture" to "pooled")."""
        return ("pooled",)

    def use_descriptor(self, descriptor: str) -> None:
        """Make ``descriptor`` (one of :attr:`descriptors`) the style vector that features and galleries get."""
        if descriptor not in DESCRIPTORS:
            raise UserError(f"unknown style vector {descriptor!r}; use one of {', '.join(DESCRIPTORS)}")
        if descriptor not in self.descriptors:
            raise UserError(f"{self.checkpoint} computes only {' and '.join(self.descriptors)} style vectors (texture "
                            "ones need an LSNet model folder or a newer export); use --descriptor pooled, or export "
                            "the model again")
        self.descriptor = descriptor

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def runs_on_cpu(self) -> bool:
        """Whether the model computes on the CPU (then resizing images on threads competes with it)."""
        return True

    def _batches(self, images: Sequence[ImageInput], names: Sequence[str], mode: str, batch_size: int,
                 num_workers: int, skipped: list[SkippedImage] | None,
                 progress: bool) -> Iterator[tuple[list[str], np.ndarray | None, np.ndarray | None]]:
        """Per batch of readable images: (names, features or None, probabilities or None), float32 numpy; an
        unreadable image goes to ``skipped`` (raises :class:`data.images.ImageLoadError` when it is None)."""
        raise NotImplementedError

    def logits_batches(self, images: Sequence[ImageInput], names: Sequence[str], *, batch_size: int = 32,
                       num_workers: int = 0, skipped: list[SkippedImage] | None = None,
                       progress: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(names, float32 logits)`` per batch of readable images (unreadable ones as in :meth:`_batches`)."""
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over the classes; independent sigmoids for a multi-label model (``multi_label`` in its config)."""
        logits = logits.astype(np.float32)
        if self.config.get("multi_label"):
            return 1.0 / (1.0 + np.exp(-logits))
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "cluster" and self.class_names is None:
            raise UserError("classification needs the class names: pass the class_mapping.csv from training "
                            "(--class-csv), or use --mode cluster")

    def stream_paths(
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
    ) -> Iterator[BatchResult]:
        """:meth:`run_paths` one batch at a time: a :class:`BatchResult` per batch, whose ``skipped`` are the files
        found unreadable since the previous one (a last result may hold only those). Every image is in exactly one
        result, in input order, so nothing of the run needs to stay in memory. ``batch_size`` is used as it is (a
        compiled model pads every batch to it)."""
        check_run_args(top_k, threshold, batch_size, num_workers)
        self._check_mode(mode)
        if names is None:
            names = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else str(i) for i, im in enumerate(images)]
        skipped: list[SkippedImage] | None = [] if skip_unreadable else None
        for batch_names, batch_features, probs in self._batches(images, names, mode, batch_size, num_workers,
                                                                skipped, progress):
            classifications = None if probs is None else top_k_classes(probs, self.class_names, top_k, threshold)
            yield BatchResult(batch_names, classifications if mode != "cluster" else None,
                              None if mode == "classify" else batch_features, list(skipped or []),
                              self._extras(batch_names))
            if skipped:
                skipped.clear()
        if skipped:
            empty = None if mode == "classify" else np.zeros((0, self.feature_dim), np.float32)
            yield BatchResult([], None if mode == "cluster" else [], empty, list(skipped), self._extras([]))

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
        result = BatchResult([], [] if mode != "cluster" else None, None, [], None)
        features: list[np.ndarray] = []
        for batch in self.stream_paths(images, mode, names=names, top_k=top_k, threshold=threshold,
                                       batch_size=max(1, min(batch_size, len(images))), num_workers=num_workers,
                                       skip_unreadable=skip_unreadable, progress=progress):
            result.names.extend(batch.names)
            result.skipped.extend(batch.skipped)
            if batch.classifications is not None:
                result.classifications.extend(batch.classifications)
            if batch.features is not None:
                features.append(batch.features)
            if batch.extras is not None:
                result.extras = (result.extras or []) + batch.extras
        if mode != "classify":
            result.features = np.concatenate(features) if features else np.zeros((0, self.feature_dim), np.float32)
        return result

    def _extras(self, names: list[str]) -> list[dict[str, Any]] | None:
        """Per-image entries a model kind adds to the results of the images ``names`` (none by default)."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What this model's outputs depend on, JSON-ready: a changed checkpoint file, style vector, preprocessing,
        class list, device or precision gives another fingerprint (how a resumed run knows its model)."""
        device = getattr(self, "device", None)
        classes = "\n".join(self.class_names) if self.class_names is not None else None
        checkpoint = None if self.checkpoint is None else file_identity(self.checkpoint)
        return {"model": getattr(self, "model_name", None), "checkpoint": checkpoint,
                "style vector": [self.descriptor, self.feature_dim],
                "preprocessing": json.loads(json.dumps(getattr(self, "data_config", {}), default=str)),
                "class names": None if classes is None else hashlib.sha256(classes.encode()).hexdigest(),
                "device": getattr(device, "type", "cpu"), "--amp": bool(getattr(self, "amp", False)),
                "--compile": getattr(self, "_compiled", None) is not None}

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
        names, bad_names = directory_images(input_dir, recursive)
        result = self.run_paths(JoinedPaths(input_dir, names), mode, names=names, top_k=top_k, threshold=threshold,
                                batch_size=batch_size, num_workers=num_workers, progress=progress)
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
