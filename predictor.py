"""Artist-model inference as importable functions: load a model once, then classify images and extract style features.

A web service or a node in an image-generation UI loads the model once and calls it per request::

    from predictor import load_model_bundle

    artist_model = load_model_bundle("runs/artists")          # a model folder or a checkpoint file
    artist_model.classify(pil_image, top_k=5)                  # [{"class_id", "class_name", "probability"}, ...]
    artist_model.extract_features(pil_image)                   # np.ndarray (feature_dim,), float32

:func:`run_batched` is the generic part (decoding with worker threads or processes, batched inference, skipped-file
tracking, progress bar) that other prediction scripts reuse with their own per-batch computation.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import (
    CLASS_MAPPING_FILE,
    ImageLoadError,
    compare_class_mappings,
    is_image_file,
    load_image,
    read_class_mapping,
    to_rgb,
)
from data.scan import default_workers, walk_files
from data.transforms import build_inference_transform, normalize_batch
from model.lsnet_artist import ARTIST_MODELS
from utils import (
    MODEL_FOLDER_FILES,
    Checkpoint,
    UserError,
    compile_for_inference,
    find_checkpoint,
    guess_architecture,
    load_checkpoint,
    read_checkpoint,
    replace_batchnorm,
    resolve_device,
)

__all__ = [
    "CHECKPOINT_FILES",
    "CONFIG_FILE",
    "MODES",
    "ArtistModel",
    "BatchResult",
    "ModelSource",
    "SkippedImage",
    "add_runtime_args",
    "build_eval_transform",
    "list_images",
    "load_model_bundle",
    "resolve_model_source",
    "run_batched",
]

MODES = ("classify", "cluster", "both")
# Checkpoint files looked for in a model folder, in this order (training output, published community models).
CHECKPOINT_FILES = MODEL_FOLDER_FILES
CONFIG_FILE = "config.json"

ImageInput = Image.Image | str | os.PathLike | BinaryIO


# --------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be read: its name (relative path) and the loader's reason."""

    path: str
    reason: str


class _ImageDataset(Dataset):
    """Decodes (shared loader) and preprocesses one image; an unreadable one becomes ``(name, None, reason)``."""

    def __init__(self, images: Sequence[ImageInput], names: Sequence[str], transform: Callable):
        self.images = images
        self.names = names
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        image = self.images[index]
        try:
            # In-memory images get the loader's conversions too (EXIF orientation, transparency on white, ...).
            image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        except ImageLoadError as err:
            return self.names[index], None, err.reason
        return self.names[index], self.transform(image), None


Batch = tuple[list[str], torch.Tensor | None, list[SkippedImage]]  # names, stacked readable images, skipped


def _collate_readable(batch: list[tuple[str, torch.Tensor | None, str | None]]) -> Batch:
    """Stack the readable images of a batch; report the unreadable ones separately (so no output row shifts)."""
    names = [name for name, tensor, _ in batch if tensor is not None]
    tensors = [tensor for _, tensor, _ in batch if tensor is not None]
    skipped = [SkippedImage(name, reason) for name, tensor, reason in batch if tensor is None]
    return names, torch.stack(tensors) if tensors else None, skipped


def _decode_in_turns(dataset: _ImageDataset, batch_size: int, threads: int) -> Iterator[Batch]:
    """Batches decoded by a pool of ``threads`` threads, one batch at a time (PIL releases the GIL while it decodes
    and resamples). For a model on the CPU: decoding and the model take turns on all cores, instead of worker
    processes preempting the model's threads mid-computation (on 2 cores 0.79 instead of 0.67 of the model-only
    images/s, bench/results.md)."""
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            yield _collate_readable(list(pool.map(dataset.__getitem__, indices)))


def run_batched(
    compute: Callable[[torch.Tensor], Any],
    images: Sequence[ImageInput],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    skipped: list[SkippedImage] | None = None,
    progress: bool = False,
    desc: str = "inference",
) -> Iterator[tuple[list[str], Any]]:
    """Yield ``(names, compute(batch))`` for batches of images decoded and preprocessed by ``num_workers`` workers.

    For a CUDA device the workers are DataLoader processes that decode the next batches while the GPU computes; for
    the CPU they are threads that decode each batch in turn with the model (see :func:`_decode_in_turns`).

    ``images`` are paths, file objects or PIL images; ``names`` (default: ``str`` of each path, or its index)
    label them. ``compute`` gets a batch tensor on ``device`` and runs under ``torch.inference_mode``.
    Unreadable images are dropped from their batch, so outputs always line up with the yielded names: with a
    ``skipped`` list they are appended to it and warned about once on stderr, without one the first raises
    :class:`data.images.ImageLoadError`.
    """
    if names is None:
        names = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else str(i) for i, im in enumerate(images)]
    device = torch.device(device)
    dataset = _ImageDataset(images, names, transform)
    batches: Iterable[Batch]
    if device.type == "cpu" and num_workers > 0:
        batches = _decode_in_turns(dataset, batch_size, min(num_workers, batch_size))
    else:
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_readable,
                             num_workers=min(num_workers, math.ceil(len(images) / batch_size)),
                             pin_memory=device.type == "cuda")
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch_names, batch, batch_skipped in batches:
            for item in batch_skipped:
                if skipped is None:
                    raise ImageLoadError(item.path, item.reason)
                skipped.append(item)
                tqdm.write(f"warning: skipping {item.path} ({item.reason})", file=sys.stderr)
            if batch is not None:
                with torch.inference_mode():
                    output = compute(batch.to(device, non_blocking=True))
                yield batch_names, output
            bar.update(len(batch_names) + len(batch_skipped))


def add_runtime_args(parser: argparse.ArgumentParser, precision: bool = True) -> argparse.ArgumentParser:
    """The flags every inference script shares: ``--device``, ``--num-workers`` and, with ``precision``, ``--amp``
    and ``--compile`` (passed on to :func:`load_model_bundle` and :func:`run_batched`)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--num-workers", type=int, default=min(8, default_workers()),
                        help="image decoding workers: threads taking turns with a CPU model, processes feeding a GPU "
                             "(default: CPU cores, at most 8)")
    if precision:
        parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the model: faster for many images after tens of seconds of compiling")
    return parser


def list_images(input_dir: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files (by extension) under ``input_dir`` as sorted relative paths with forward slashes.

    Hidden folders are left out; other files are ignored. Relative paths keep equal file names in different
    sub-folders apart.
    """
    root = Path(input_dir)
    return sorted(path.relative_to(root).as_posix() for path in walk_files(root, recursive) if is_image_file(path))


# --------------------------------------------------------------------------------------------- loading


@dataclass
class ModelSource:
    """Where a model's pieces are: the checkpoint file, its class mapping and its ``config.json`` (if any)."""

    checkpoint: Path
    class_csv: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or delete it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object with keys such as 'model'; fix or delete it")
    return config


def resolve_model_source(checkpoint: str | os.PathLike, class_csv: str | os.PathLike | None = None) -> ModelSource:
    """Resolve a checkpoint file or a model folder (checkpoint + ``class_mapping.csv`` + optional ``config.json``).

    A folder supplies its ``config.json`` and, unless ``class_csv`` is given, its class mapping; a file uses
    only ``class_csv``.
    """
    path = Path(checkpoint)
    if path.is_file():
        return ModelSource(path, Path(class_csv) if class_csv else None)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}; pass a .pth file or a model folder holding one")
    config = _read_config(path / CONFIG_FILE)
    preferred = [config["checkpoint"]] if isinstance(config.get("checkpoint"), str) else []
    found = find_checkpoint(path, [*preferred, *CHECKPOINT_FILES])
    if class_csv is None and (path / CLASS_MAPPING_FILE).is_file():
        class_csv = path / CLASS_MAPPING_FILE
    return ModelSource(found, Path(class_csv) if class_csv else None, config, path)


def _square_size(value: Any, source: str) -> int:
    """An input size given as ``224``, ``[224, 224]`` or ``[3, 224, 224]`` (square only)."""
    sizes = [value] if isinstance(value, (int, float)) else list(value)[-2:]
    if not sizes or any(int(s) != sizes[0] or int(s) <= 0 for s in sizes):
        raise UserError(f"{source}: input size {value!r} is not a positive square size; pass --input-size")
    return int(sizes[0])


def build_eval_transform(
    model: nn.Module, input_size: int | None = None, config: dict[str, Any] | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """The eval preprocessing of the model's timm ``pretrained_cfg`` at ``input_size``, and its data config.

    Resize the short side to ``int(input_size / crop_pct)`` (bicubic) and center crop, as one resample, to a uint8
    tensor; :func:`data.transforms.normalize_batch` with the config's ``mean``/``std`` completes it on whole
    batches (:meth:`ArtistModel.run_model` does). A ``config.json``'s ``crop_pct``/``crop_mode``/``mean``/``std``/
    ``interpolation`` override the model's defaults (a model fine-tuned with ``crop_mode="squash"`` is evaluated
    that way).
    """
    config = config or {}
    args = {key: config.get(key) for key in ("crop_pct", "crop_mode", "mean", "std", "interpolation")}
    if input_size is not None:
        args["input_size"] = (3, input_size, input_size)
    data_config = resolve_data_config(args=args, model=model)
    return build_inference_transform(data_config), data_config


def _agreed_value(label: str, values: dict[str, int | None]) -> int | None:
    """The one value the given sources agree on (None when none gives one); a disagreement is a UserError."""
    given = {source: value for source, value in values.items() if value is not None}
    if len(set(given.values())) > 1:
        detail = ", ".join(f"{source} has {value}" for source, value in given.items())
        raise UserError(f"{label} disagree: {detail}; use the class_mapping.csv and settings trained with it")
    return next(iter(given.values()), None)


def _model_name(explicit: str | None, config: dict[str, Any], source: ModelSource, ckpt: Checkpoint) -> str:
    name = explicit or config.get("model") or ckpt.args.get("model")
    if not name:
        where = f"{source.folder / CONFIG_FILE} is missing and " if source.folder else ""
        guess = guess_architecture(ckpt.state_dict)
        hint = f" (the weights look like {guess})" if guess else ""
        raise UserError(f"{where}{ckpt.path} does not record its architecture; pass --model{hint}, one of "
                        f"{', '.join(ARTIST_MODELS)}")
    if name not in ARTIST_MODELS:
        raise UserError(f"unknown model {name!r}; use one of {', '.join(ARTIST_MODELS)}")
    return name


def load_model_bundle(
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    class_csv: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
    feature_dim: int | None = None,
    amp: bool = False,
    require_class_names: bool = False,
    compile: bool = False,
) -> "ArtistModel":
    """Load an artist model (checkpoint file or model folder) ready for inference: eval mode, BN fused.

    Args:
        checkpoint: a ``.pth`` file, or a folder with ``model_best.pth``/``best_checkpoint.pth``/``checkpoint.pth``,
            ``class_mapping.csv`` and an optional ``config.json`` naming the architecture under ``model``.
        model_name: architecture; default: the folder's ``config.json``, else the config or training arguments
            stored in the checkpoint.
        class_csv: the ``class_mapping.csv`` from training (default: the folder's); needed to classify.
        device: default cuda when available, else cpu.
        input_size: default the checkpoint's training size, else the config's, else the model's.
        num_classes, feature_dim: optional checks; detected from the weights and the class mapping.
        amp: autocast (float16 on CUDA, bfloat16 on CPU).
        require_class_names: fail early (before reading the weights) when no class mapping is available.
        compile: run the model through :func:`utils.compile_for_inference` (the first batch compiles it).

    Raises:
        UserError: missing files, unknown or wrong architecture, or class count / feature size disagreements.
    """
    source = resolve_model_source(checkpoint, class_csv)
    if require_class_names and source.class_csv is None:
        sibling = source.checkpoint.parent / CLASS_MAPPING_FILE
        hint = f"--class-csv {sibling}" if sibling.is_file() else f"--class-csv with the {CLASS_MAPPING_FILE} " \
            "written by training next to the checkpoint"
        raise UserError(f"classification needs the class names of {source.checkpoint.name}; pass {hint}")
    class_names = read_class_mapping(source.class_csv) if source.class_csv else None
    device = resolve_device(device)
    ckpt = read_checkpoint(source.checkpoint)
    # Training also stores its config.json in the checkpoint; a folder's config.json takes precedence.
    embedded = ckpt.extra.get("config")
    config = {**(embedded if isinstance(embedded, dict) else {}), **source.config}
    name = _model_name(model_name, config, source, ckpt)

    num_classes = _agreed_value("class counts", {
        f"the checkpoint's head ({ckpt.path.name})": ckpt.num_classes,
        f"{source.class_csv}": len(class_names) if class_names is not None else None,
        "--num-classes": num_classes,
        CONFIG_FILE: config.get("num_classes"),
    })
    if class_names is not None and ckpt.num_classes is None:
        raise UserError(f"{ckpt.path} has no classifier head, so it cannot classify; use --mode cluster")
    stored_names = ckpt.extra.get("class_names")
    if class_names is not None and isinstance(stored_names, list):
        differences = compare_class_mappings(stored_names, class_names, ckpt.path.name, str(source.class_csv))
        if differences:
            raise UserError(f"{source.class_csv} does not match the class names stored in {ckpt.path.name} "
                            f"({differences[0]}); use the class_mapping.csv written with this checkpoint")
    feature_dim = _agreed_value("feature sizes", {
        f"the checkpoint's weights ({ckpt.path.name})": ckpt.feature_dim,
        "--feature-dim": feature_dim,
        CONFIG_FILE: config.get("feature_dim"),
    })

    net = timm.create_model(name, num_classes=num_classes or 0, feature_dim=feature_dim,
                            distillation=ckpt.distillation)
    load_checkpoint(ckpt, net)
    net = replace_batchnorm(net.eval()).to(device)

    if input_size is None:
        for label, value in ((f"{ckpt.path} args", ckpt.args.get("input_size")),
                             (CONFIG_FILE, config.get("input_size"))):
            if value is not None:
                input_size = _square_size(value, label)
                break
    transform, data_config = build_eval_transform(net, input_size, config)
    return ArtistModel(net, transform, class_names, device=device, amp=amp, model_name=name,
                       data_config=data_config, checkpoint=ckpt.path, config=config, compile=compile)


# --------------------------------------------------------------------------------------------- inference


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


class ArtistModel:
    """A loaded artist model with its preprocessing and class names. Build it with :func:`load_model_bundle`.

    Methods take one image (PIL image, path or file object) and return one result, or a list of images and
    return a list (or, for features, an ``(N, feature_dim)`` array). Built directly, ``model`` must already be
    in eval mode on ``device`` (fused or not) and ``transform`` its eval preprocessing (uint8 output is normalised
    with ``data_config``'s ``mean``/``std``, float output is used as it is). ``config`` is the training
    ``config.json`` (e.g. ``multi_label``: trained with sigmoid outputs). With ``compile``, batches run through
    :func:`utils.compile_for_inference`; a run's partial batches are padded to its batch size (the padding is dropped
    from the outputs), so they do not compile the model again.
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
        self._compiled = compile_for_inference(model) if compile else None
        self._compiled_batch = 0  # largest batch the compiled model has run (0: not compiled yet)

    @property
    def input_size(self) -> int:
        return int(self.data_config.get("input_size", (3, 224, 224))[-1])

    @property
    def feature_dim(self) -> int:
        return int(self.model.head_hidden_size)

    def autocast(self) -> torch.autocast:
        """The model's mixed-precision context: float16 on CUDA, bfloat16 on the CPU; a no-op unless ``amp``."""
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp)

    def run_model(self, batch: torch.Tensor, batch_size: int | None = None, **kwargs: Any) -> Any:
        """The model's output for a batch of :attr:`transform` outputs already on :attr:`device`: normalised,
        under :meth:`autocast`, compiled when built with ``compile``. Call it under ``torch.inference_mode()``.

        ``batch_size`` is the run's batch size: a compiled model pads smaller batches to it, so it compiles once per
        batch size (default: pad to the largest batch so far).
        """
        batch = normalize_batch(batch, self.data_config.get("mean", IMAGENET_DEFAULT_MEAN),
                                self.data_config.get("std", IMAGENET_DEFAULT_STD))
        with self.autocast():
            if self._compiled is None:
                return self.model(batch, **kwargs)
            return self._run_compiled(batch, batch_size or 0, kwargs)

    def _run_compiled(self, batch: torch.Tensor, batch_size: int, kwargs: dict[str, Any]) -> Any:
        count = len(batch)
        padded = max(count, batch_size or self._compiled_batch)
        if count < padded:
            batch = torch.cat([batch, batch.new_zeros((padded - count, *batch.shape[1:]))])
        try:
            output = self._compiled(batch, **kwargs)
        except Exception as err:  # Inductor needs a C++ compiler on the CPU and Triton on a GPU
            if self._compiled_batch:
                raise
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"torch.compile failed on this machine ({detail}); run without --compile") from err
        self._compiled_batch = max(self._compiled_batch, padded)
        if isinstance(output, tuple):
            return tuple(out[:count] for out in output)
        return output[:count]

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

    def _top_k(self, probs: torch.Tensor, top_k: int, threshold: float) -> list[list[dict[str, Any]]]:
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            [{"class_id": i, "class_name": self.class_names[i], "probability": p}
             for p, i in zip(row_values, row_indices, strict=True) if p >= threshold]
            for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
        ]

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
        for label, value, minimum in (("top-k", top_k, 1), ("batch size", batch_size, 1), ("workers", num_workers, 0)):
            if value < minimum:
                raise UserError(f"{label} must be at least {minimum}, got {value}")
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold is a probability between 0 and 1, got {threshold}")
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
                classifications.extend(self._top_k(probs, top_k, threshold))
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
        # A line break in a file name would shift the lines of image_names.txt against the feature rows.
        bad_names = [SkippedImage(name, "file name holds a line break; rename the file") for name in names
                     if "\n" in name or "\r" in name]
        names = [name for name in names if "\n" not in name and "\r" not in name]
        for item in bad_names:
            print(f"warning: skipping {item.path!r} ({item.reason})", file=sys.stderr)
        paths = [os.path.join(input_dir, name) for name in names]
        result = self.run_paths(paths, mode, names=names, top_k=top_k, threshold=threshold, batch_size=batch_size,
                                num_workers=num_workers, progress=progress)
        result.skipped[:0] = bad_names
        return result

    def _run_inputs(
        self, images: ImageInput | Sequence[ImageInput], mode: str, top_k: int = 5, threshold: float = 0.0,
        batch_size: int = 32,
    ) -> tuple[bool, BatchResult]:
        """Run one image or a list of images (raising on unreadable ones); also says whether it was one image."""
        single = not isinstance(images, (list, tuple))
        result = self.run_paths([images] if single else images, mode, top_k=top_k, threshold=threshold,
                                batch_size=batch_size, skip_unreadable=False)
        return single, result

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        mode: str = "classify",
        top_k: int = 5,
        threshold: float = 0.0,
        batch_size: int = 32,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``{"classification": [...], "features": np.ndarray}`` (per ``mode``) for an image or a list of images.

        Raises:
            data.images.ImageLoadError: an image cannot be read.
        """
        single, result = self._run_inputs(images, mode, top_k, threshold, batch_size)
        outputs = []
        for i in range(len(result.names)):
            output: dict[str, Any] = {}
            if result.classifications is not None:
                output["classification"] = result.classifications[i]
            if result.features is not None:
                output["features"] = result.features[i]
            outputs.append(output)
        return outputs[0] if single else outputs

    def classify(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, threshold: float = 0.0, batch_size: int = 32
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Top-k ``{"class_id", "class_name", "probability"}`` (most likely first, probability >= threshold).

        One list for one image, a list of lists for a list of images.
        """
        single, result = self._run_inputs(images, "classify", top_k, threshold, batch_size)
        return result.classifications[0] if single else result.classifications

    def extract_features(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Style feature vectors (float32): ``(feature_dim,)`` for one image, ``(N, feature_dim)`` for a list."""
        single, result = self._run_inputs(images, "cluster", batch_size=batch_size)
        return result.features[0] if single else result.features
