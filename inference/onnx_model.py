"""An exported model folder (``model.onnx`` + ``config.json`` + ``class_mapping.csv``) run with onnxruntime.

:class:`OnnxModel` has the API of :class:`inference.artist_model.ArtistModel` (``classify``, ``extract_features``,
``predict``, ``run_paths``, ``run_directory``) and returns the same structures. This module imports neither torch nor
timm: a deployment needs numpy, Pillow and onnxruntime. The preprocessing mirrors :mod:`data.transforms` (the one
evaluation preprocessing) on numpy arrays: the same resize + center crop (:func:`data.resize.eval_resize_crop`), then
``(x / 255 - mean) / std`` in float32 with the same operations as :func:`data.transforms.normalize_batch`.
"""

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from artifacts.config_file import ONNX_FILE, read_config
from data.class_mapping import CLASS_MAPPING_FILE, read_class_mapping
from data.images import ImageLoadError, load_image, to_rgb
from data.resize import IMAGENET_MEAN, IMAGENET_STD, eval_resize_crop
from errors import UserError, import_optional
from inference.pipeline import ordered_map
from inference.results import BatchedModel, ImageInput, SkippedImage, report_skipped

STYLE_OUTPUTS = {"pooled": "features", "texture": "texture"}  # graph output of each style vector (deploy/export_onnx)


def eval_preprocess(image: Image.Image, input_size: int, config: dict[str, Any]) -> np.ndarray:
    """``(3, size, size)`` uint8 array: the evaluation resize + center crop of ``config`` (``crop_pct``,
    ``crop_mode``, ``interpolation``), the pixels :func:`data.transforms.build_inference_transform` gives."""
    crop = eval_resize_crop(image, (input_size, input_size), config.get("crop_pct"), config.get("crop_mode"),
                            config.get("interpolation"))
    return np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1)


def normalize_uint8(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A uint8 batch (N, C, H, W) as float32 ``(x / 255 - mean) / std``, as :func:`data.transforms.normalize_batch`
    computes it (the same operations in the same order: equal bits), image by image in place (in the cache)."""
    shape = (-1, 1, 1)
    mean_a = np.asarray(mean, np.float32).reshape(shape)
    std_a = np.asarray(std, np.float32).reshape(shape)
    out = np.empty(batch.shape, np.float32)
    for image, normalized in zip(batch, out, strict=True):
        np.divide(image, np.float32(255), out=normalized, dtype=np.float32)
        normalized -= mean_a
        normalized /= std_a
    return out


def _open_session(path: Path, threads: int | None, session_config: dict[str, str] | None = None) -> Any:
    """An onnxruntime CPU session; ``threads`` and ``session_config`` (e.g. spinning) come from
    :func:`inference.threads.onnx_thread_settings`."""
    ort = import_optional("onnxruntime", "requirements-deploy.txt", f"the ONNX model {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise UserError(f"{path} is not a loadable ONNX model ({str(err).splitlines()[0][:160]}); "
                        "export it again with export.py") from None


class OnnxModel(BatchedModel):
    """An exported model folder run with onnxruntime on the CPU. Build it with :func:`load_onnx_model` (or
    :func:`inference.loading.load_model_bundle`, which detects ``model.onnx``). ``threads``, ``session_config`` and
    ``lanes`` (batches run at once by runs with workers) come from :mod:`inference.threads`."""

    def __init__(self, path: Path, class_names: list[str] | None, config: dict[str, Any],
                 input_size: int | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None, lanes: int = 1):
        self.checkpoint = path
        self.lanes = lanes
        self.class_names = class_names
        self.config = config
        self.model_name = config.get("model")
        self.session = _open_session(path, threads, session_config)
        self._input = self.session.get_inputs()[0]
        exported = self._input.shape[-1]
        size = input_size or config.get("input_size") or exported
        if isinstance(exported, int) and size != exported:
            raise UserError(f"{path} was exported for {exported} px inputs, not {size}; export it again with "
                            "--input-size or --dynamic-size")
        self.data_config = {"input_size": (3, int(size), int(size)), "mean": tuple(config.get("mean", IMAGENET_MEAN)),
                            "std": tuple(config.get("std", IMAGENET_STD)), "crop_pct": config.get("crop_pct"),
                            "interpolation": config.get("interpolation", "bicubic")}
        self._outputs_checked = False
        classes = self.session.get_outputs()[0].shape[-1]
        if class_names is not None and isinstance(classes, int) and len(class_names) != classes:
            raise UserError(f"{path} has {classes} classes but its class mapping has {len(class_names)}; use the "
                            f"{CLASS_MAPPING_FILE} exported with it")

    @property
    def input_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    @property
    def descriptors(self) -> tuple[str, ...]:
        """Pooled style vectors, and texture ones when the graph has the ``texture`` output (exports from before
        texture vectors have not)."""
        outputs = {output.name for output in self.session.get_outputs()}
        return ("pooled", "texture") if "texture" in outputs else ("pooled",)

    @property
    def feature_dim(self) -> int:
        wanted = STYLE_OUTPUTS[self.descriptor]
        return int(next(o.shape[-1] for o in self.session.get_outputs() if o.name == wanted))

    def transform(self, image: Image.Image) -> np.ndarray:
        """The eval preprocessing of one RGB image: ``(3, size, size)`` uint8."""
        return eval_preprocess(image, self.input_size, self.config)

    def run_model(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, style vectors)`` of a uint8 batch from :meth:`transform` (normalised here); the first batch's
        outputs must be finite."""
        return self._check_finite(self._session_run(batch))

    def _session_run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, style vectors)`` of a uint8 batch; safe to call from several threads at once."""
        inputs = normalize_uint8(batch, self.data_config["mean"], self.data_config["std"])
        logits, features = self.session.run(["logits", STYLE_OUTPUTS[self.descriptor]], {self._input.name: inputs})
        return logits, features

    def _check_finite(self, outputs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not self._outputs_checked:
            if not all(np.isfinite(output).all() for output in outputs):
                raise UserError(f"{self.checkpoint} gives NaN or infinite outputs on the first batch; export the "
                                "model again from a checkpoint whose training did not diverge")
            self._outputs_checked = True
        return outputs

    def _decode(self, item: tuple[ImageInput, str]) -> tuple[str, np.ndarray | None, str | None]:
        image, name = item
        try:
            image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        except ImageLoadError as err:
            return name, None, err.reason
        return name, self.transform(image), None

    def _lane(self, items: list[tuple[ImageInput, str]], run: bool, pool: ThreadPoolExecutor | None = None
              ) -> tuple[list[str], np.ndarray | tuple[np.ndarray, np.ndarray] | None, list[SkippedImage]]:
        """One batch on one lane: decoded (on ``pool``'s threads when given), preprocessed and (with ``run``) through
        the session; ``(names of the readable images, uint8 batch or session outputs or None, the unreadable ones)``."""
        decoded = list(pool.map(self._decode, items)) if pool else [self._decode(item) for item in items]
        names = [name for name, array, _ in decoded if array is not None]
        batch = np.stack([array for _, array, _ in decoded if array is not None]) if names else None
        if run and batch is not None:
            batch = self._session_run(batch)
        return names, batch, [SkippedImage(name, reason) for name, array, reason in decoded if array is None]

    def _lanes(self, images: Sequence[ImageInput], names: Sequence[str], batch_size: int, num_workers: int,
               skipped: list[SkippedImage] | None, progress: bool, run: bool) -> Iterator[tuple[list[str], Any]]:
        """``(names, uint8 batch or session outputs)`` per batch of readable images, in order. With ``num_workers``
        the batches run on :attr:`lanes` threads at once (:mod:`inference.threads`); a model of one lane has each
        batch decoded by ``num_workers`` threads instead, in turns with the session (its threads use every core).
        Unreadable images go to ``skipped`` (warned about on stderr) or, without it, raise
        :class:`data.images.ImageLoadError`."""
        chunks = (list(zip(images[start:start + batch_size], names[start:start + batch_size], strict=True))
                  for start in range(0, len(images), batch_size))
        workers = self.lanes if num_workers > 0 else 0
        pool = ThreadPoolExecutor(num_workers, thread_name_prefix="decode") if workers == 1 else None
        with tqdm(total=len(images), desc="onnx", unit="img", disable=not progress, file=sys.stderr) as bar, \
                pool or contextlib.nullcontext():
            for batch_names, batch, batch_skipped in ordered_map(lambda chunk: self._lane(chunk, run, pool), chunks,
                                                                 workers):
                report_skipped(batch_skipped, skipped, lambda line: tqdm.write(line, file=sys.stderr))
                if batch is not None:
                    yield batch_names, self._check_finite(batch) if run else batch
                bar.update(len(batch_names) + len(batch_skipped))

    def decoded_batches(self, images: Sequence[ImageInput], names: Sequence[str], batch_size: int, num_workers: int,
                        skipped: list[SkippedImage] | None,
                        progress: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(names, uint8 batch)`` of the readable images (see :meth:`_lanes`)."""
        yield from self._lanes(images, names, batch_size, num_workers, skipped, progress, run=False)

    def logits_batches(self, images: Sequence[ImageInput], names: Sequence[str], *, batch_size: int = 32,
                       num_workers: int = 0, skipped: list[SkippedImage] | None = None,
                       progress: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
        for batch_names, (logits, _) in self._lanes(images, names, batch_size, num_workers, skipped, progress, True):
            yield batch_names, logits

    def _batches(self, images: Sequence[ImageInput], names: Sequence[str], mode: str, batch_size: int,
                 num_workers: int, skipped: list[SkippedImage] | None,
                 progress: bool) -> Iterator[tuple[list[str], np.ndarray | None, np.ndarray | None]]:
        for batch_names, (logits, features) in self._lanes(images, names, batch_size, num_workers, skipped,
                                                           progress, True):
            probs = None if mode == "cluster" else self.probabilities(logits)
            yield batch_names, (None if mode == "classify" else features.astype(np.float32)), probs


def load_onnx_model(folder: str | os.PathLike, class_csv: str | os.PathLike | None = None,
                    input_size: int | None = None, require_class_names: bool = False,
                    threads: int | None = None, session_config: dict[str, str] | None = None,
                    lanes: int = 1) -> OnnxModel:
    """An exported model folder (``model.onnx`` + ``config.json`` + ``class_mapping.csv``) ready for inference;
    ``threads``, ``session_config`` and ``lanes`` set up its onnxruntime session (:mod:`inference.threads`)."""
    folder = Path(folder)
    path = folder / ONNX_FILE
    if not path.is_file():
        raise UserError(f"{folder} holds no {ONNX_FILE}; export one with: python export.py --checkpoint MODEL "
                        f"--output-dir {folder}")
    config = read_config(folder)
    class_csv = Path(class_csv) if class_csv else folder / CLASS_MAPPING_FILE
    class_names = read_class_mapping(class_csv) if class_csv.is_file() else None
    if class_names is None and require_class_names:
        raise UserError(f"classification needs the class names of {path}; pass --class-csv with its "
                        f"{CLASS_MAPPING_FILE}")
    return OnnxModel(path, class_names, config, input_size, threads, session_config, lanes)
