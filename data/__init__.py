"""Data layer: image loading and verification, prepared ImageFolder datasets, transforms, samplers, multi-label."""

from .class_mapping import CLASS_MAPPING_FILE, compare_class_mappings, read_class_mapping, write_class_mapping
from .datasets import RobustImageFolder, TransformConfig, build_dataset, build_transform, dataset_classes
from .images import IMAGE_EXTENSIONS, ImageLoadError, is_image_file, load_image, to_rgb, verify_image
from .multilabel import (
    MultiLabelImageDataset,
    format_labels,
    parse_labels,
    read_multilabel_csv,
    write_multilabel_csv,
)
from .prepare import prepare_dataset
from .samplers import RASampler, build_sampler
from .scan import ScanCache, verify_images
from .threeaugment import three_augment_transform

__all__ = [
    "CLASS_MAPPING_FILE",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "MultiLabelImageDataset",
    "RASampler",
    "RobustImageFolder",
    "ScanCache",
    "TransformConfig",
    "build_dataset",
    "build_sampler",
    "build_transform",
    "compare_class_mappings",
    "dataset_classes",
    "format_labels",
    "is_image_file",
    "load_image",
    "parse_labels",
    "prepare_dataset",
    "read_class_mapping",
    "read_multilabel_csv",
    "three_augment_transform",
    "to_rgb",
    "verify_image",
    "verify_images",
    "write_class_mapping",
    "write_multilabel_csv",
]
