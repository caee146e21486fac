"""Data layer: image loading and verification, prepared ImageFolder datasets, transforms, samplers, multi-label.

The names below are imported on first use (PEP 562), so ``data.images`` and ``data.class_mapping`` load without
torch (the ONNX runtime path of :mod:`inference.onnx_model` needs only numpy and Pillow).
"""

import importlib
from typing import Any

_SOURCES = {
    "class_mapping": ("CLASS_MAPPING_FILE", "compare_class_mappings", "read_class_mapping", "write_class_mapping"),
    "datasets": ("RobustImageFolder", "SplitScan", "TransformConfig", "build_dataset", "build_transform",
                 "dataset_classes", "scan_split"),
    "images": ("IMAGE_EXTENSIONS", "ImageLoadError", "is_image_file", "load_image", "to_rgb", "verify_image"),
    "multilabel": ("MultiLabelImageDataset", "annotation_counts", "format_labels", "parse_labels",
                   "read_multilabel_csv", "write_multilabel_csv"),
    "prepare": ("prepare_dataset",),
    "samplers": ("RASampler", "build_sampler"),
    "scan": ("ScanCache", "verify_images"),
    "threeaugment": ("three_augment_transform",),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"data.{module}"), name)
