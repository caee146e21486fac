"""The ``train/`` + ``val/`` ImageFolder datasets and their transforms (DeiT/LSNet ``build_dataset`` style)."""

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps
from timm.data import create_transform
from torchvision import datasets

from utils import UserError

from .class_mapping import CLASS_MAPPING_FILE, read_class_mapping
from .images import IMAGE_EXTENSIONS, load_first_readable, load_image
from .scan import ScanCache, verify_images
from .threeaugment import three_augment_transform
from .transforms import build_inference_transform, eval_data_config

__all__ = ["RobustImageFolder", "SplitScan", "TransformConfig", "build_dataset", "build_transform", "dataset_classes",
           "scan_split"]

@dataclass(frozen=True)
class TransformConfig:
    """What the training and evaluation transforms depend on: ``--input-size`` and the augmentation settings (their
    defaults are declared once, in :class:`training.config.AugmentConfig`, which builds this object).

    ``auto_augment``: a timm policy string or None (off); ``three_augment``: DeiT-III ThreeAugment instead of it;
    ``squash``: evaluate with a plain resize to ``input_size`` (``--finetune``) instead of resize + center crop;
    ``crop_scale``: the smallest area share of the training's random resized crop.
    """

    input_size: int
    color_jitter: float
    auto_augment: str | None
    interpolation: str
    reprob: float
    remode: str
    recount: int
    three_augment: bool
    squash: bool
    crop_scale: float


class RobustImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that drops unreadable images at start and survives images that break later.

    At construction every image is decoded once (in ``workers`` processes; results cached in ``cache``) and each
    rejected file is reported with its reason. During an epoch an image that cannot be loaded is reported once and
    replaced by the next readable sample, so a batch still forms.

    Args:
        root: folder with one sub-folder per class.
        classes: class names in id order (default: the sorted sub-folders, as ``ImageFolder``). Folders of other
            names are ignored.
        allow_empty: allow classes without images (e.g. a validation split of a tiny class).
        workers, cache: verification processes and result cache (see :func:`data.scan.verify_images`).
        verbose: print the per-file warnings and the scan summary.
        samples: the ``(path, class id)`` pairs of an earlier scan (:func:`scan_split`): used as they are.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        allow_empty: bool = False,
        workers: int = 0,
        cache: ScanCache | None = None,
        verbose: bool = True,
        samples: Sequence[tuple[str, int]] | None = None,
    ):
        self._given_classes = list(classes) if classes is not None else None
        self._scanned = list(samples) if samples is not None else None
        self._workers, self._cache, self._verbose = workers, cache, verbose
        self.rejected: list[tuple[str, str]] = []
        self._warned: set[str] = set()
        super().__init__(root, transform=transform, target_transform=target_transform, loader=load_image,
                         allow_empty=allow_empty)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        if self._given_classes is None:
            return super().find_classes(directory)
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}

    def make_dataset(
        self,
        directory: str | os.PathLike,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        if self._scanned is not None:
            return self._scanned
        candidates = datasets.folder.make_dataset(directory, class_to_idx, extensions=IMAGE_EXTENSIONS,
                                                  allow_empty=True)
        reasons = verify_images([path for path, _ in candidates], workers=self._workers, cache=self._cache,
                                verbose=self._verbose, desc=f"verifying {directory}")
        samples = []
        for (path, target), reason in zip(candidates, reasons, strict=True):
            if reason is None:
                samples.append((path, target))
            else:
                self.rejected.append((path, reason))
                if self._verbose:
                    print(f"warning: skipping {path}: {reason}")
        if self._verbose:
            print(f"{directory}: {len(samples)} images in {len(class_to_idx)} classes"
                  + (f", {len(self.rejected)} unreadable images skipped" if self.rejected else ""))
        present = {target for _, target in samples}
        empty = sorted(name for name, i in class_to_idx.items() if i not in present)
        if empty and not allow_empty:
            raise UserError(
                f"{len(empty)} classes have no readable image in {directory}: {', '.join(empty[:10])}"
                f"{' ...' if len(empty) > 10 else ''}; add images or remove those folders (or re-run "
                "prepare_dataset.py)"
            )
        return samples

    def __getitem__(self, index: int):
        image, used = load_first_readable(index, len(self.samples), lambda i: self.samples[i][0], self._warned)
        target = self.samples[used][1]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def dataset_classes(data_path: str | os.PathLike) -> list[str]:
    """Class names of a prepared dataset: its ``class_mapping.csv``, checked against the ``train/`` folders, or
    (without a mapping) the sorted ``train/`` folders as ``ImageFolder`` orders them."""
    root = Path(data_path)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"{train_dir} not found: --data-path must hold train/ and val/; run prepare_dataset.py first")
    folders = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())  # as ImageFolder does
    if not folders:
        raise UserError(f"{train_dir} has no class folders; run prepare_dataset.py first")
    mapping_file = root / CLASS_MAPPING_FILE
    if not mapping_file.is_file():
        return folders
    classes = read_class_mapping(mapping_file)
    folder_set = set(folders)
    missing = [name for name in classes if name not in folder_set]
    extra = sorted(folder_set - set(classes))
    if missing or extra:
        raise UserError(
            f"{mapping_file} does not match the folders in {train_dir}"
            + (f"; no folder for: {', '.join(missing[:10])}" if missing else "")
            + (f"; folders not in the mapping: {', '.join(extra[:10])}" if extra else "")
            + "; re-run prepare_dataset.py or fix the mapping"
        )
    return classes


@dataclass(frozen=True)
class SplitScan:
    """The readable images of one split (``train/`` or ``val/``) with their class ids, the dataset's classes, and
    the files left out with the reason."""

    root: Path
    is_train: bool
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]
    rejected: tuple[tuple[str, str], ...] = ()

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]


def scan_split(is_train: bool, data_path: str | os.PathLike, *, workers: int = 0,
               cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> SplitScan:
    """Verify the images of ``data_path/train`` or ``/val`` (a bad one is reported and left out).

    ``workers``: verification processes; ``cache_dir``: where the scan cache goes when the dataset folder is
    read-only (the run's output folder). Both splits use the classes of :func:`dataset_classes`, so ids agree;
    ``val/`` may lack some classes. In distributed training, scan on rank 0 first (``verbose=True``), then on the
    other ranks after a barrier: they reuse its scan cache.
    """
    root = Path(data_path)
    split_dir = root / ("train" if is_train else "val")
    classes = dataset_classes(root)
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} not found: --data-path must hold train/ and val/; run prepare_dataset.py first")
    cache = ScanCache.for_dataset(root, cache_dir)
    if cache is None and verbose:
        print(f"note: {root} is read-only and no --output-dir is set: the image scan is not cached")
    folder = RobustImageFolder(split_dir, classes, allow_empty=not is_train, workers=workers, cache=cache,
                               verbose=verbose)
    if not folder.samples:
        raise UserError(f"{split_dir} has no readable images; run prepare_dataset.py (with --val-ratio > 0 for val/)")
    return SplitScan(split_dir, is_train, tuple(classes), tuple(folder.samples), tuple(folder.rejected))


def build_dataset(scan: SplitScan, transform: TransformConfig) -> RobustImageFolder:
    """The dataset of a scanned split, transformed by :func:`build_transform` (training or evaluation)."""
    return RobustImageFolder(scan.root, list(scan.classes), transform=build_transform(scan.is_train, transform),
                             allow_empty=True, verbose=False, samples=scan.samples)


def _posterize_at_least_one_bit(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, but never asking Pillow for 0 bits (Pillow >= 11 raises; older Pillow made it black)."""
    bits = max(1, int(bits_to_keep))
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _keep_posterize_bits(transform: Callable) -> None:
    """Make the Posterize ops of timm's auto-augment policies in ``transform`` keep at least one bit."""
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", None) or getattr(step, "policy", None) or []:
            for sub_op in op if isinstance(op, (list, tuple)) else [op]:
                if "Posterize" in getattr(sub_op, "name", ""):
                    sub_op.aug_fn = _posterize_at_least_one_bit


def build_transform(is_train: bool, cfg: TransformConfig) -> Callable:
    """Training (timm RandAugment pipeline or DeiT-III ThreeAugment) or evaluation transform.

    Evaluation is inference's preprocessing (:func:`data.transforms.build_inference_transform` of
    :func:`data.transforms.eval_data_config`, normalised per image), so validation accuracy is measured on the pixels
    inference sees: resize the short side to ``input_size / 0.875`` and center-crop (bicubic), or with
    ``cfg.squash`` resize straight to ``input_size`` x ``input_size``.
    """
    if is_train:
        if cfg.three_augment:
            return three_augment_transform(cfg.input_size, cfg.color_jitter)
        transform = create_transform(
            input_size=cfg.input_size,
            is_training=True,
            scale=(cfg.crop_scale, 1.0),
            color_jitter=cfg.color_jitter,
            auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
        )
        _keep_posterize_bits(transform)
        return transform
    return build_inference_transform(eval_data_config(cfg.input_size, cfg.squash), normalize=True)
