"""The evaluation preprocessing, defined once: training's validation, inference, the service, galleries and
glance-and-focus all run it.

It is timm's eval transform (resize the short side to ``floor(size / crop_pct)`` or squash, center crop,
``(x / 255 - mean) / std``) built from a data config (``input_size``, ``interpolation``, ``mean``, ``std``,
``crop_pct``, ``crop_mode``: what ``config.json`` records), with two differences in how, not what:

* the resize and crop resample only the region the crop keeps, always horizontal pass first
  (:func:`data.resize.resize_center_crop`, shared with the torch-free ONNX path, which therefore sees the same
  pixels), and
* inference's decoding workers return uint8 tensors (timm's ``use_prefetcher`` output: a quarter of the bytes to pass
  between processes and to copy to a GPU) that :func:`normalize_batch` turns into normalised floats a batch at a
  time; validation normalises each image with the same arithmetic (``normalize=True``).
"""

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data.resize import EVAL_CROP_PCT, eval_resampling, eval_scale_size, resize_center_crop, resized_size

__all__ = ["EVAL_CROP_PCT", "NormalizeImage", "ResizeCenterCrop", "build_inference_transform", "eval_data_config",
           "normalize_batch"]


def eval_data_config(input_size: int, squash: bool = False, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD) -> dict[str, Any]:
    """The evaluation data config of a model trained at ``input_size``: resize + center crop (bicubic), or with
    ``squash`` (fine-tuned that way) a plain resize to ``input_size`` x ``input_size``."""
    return {"input_size": (3, input_size, input_size), "interpolation": "bicubic", "mean": tuple(mean),
            "std": tuple(std), "crop_pct": 1.0 if squash else EVAL_CROP_PCT,
            "crop_mode": "squash" if squash else "center"}


class ResizeCenterCrop:
    """torchvision's ``Resize(scale_size)`` followed by ``CenterCrop(size)``, resampling only what the crop keeps
    (:func:`data.resize.resize_center_crop`).

    ``scale_size`` is an int (the short side, aspect ratio kept) or ``(height, width)``; ``size`` is
    ``(height, width)``; ``interpolation`` any mode but nearest. Same sampling positions and filter as the two
    steps; the pixels equal theirs within one grey level whenever Pillow resizes the whole image horizontal pass
    first (it picks the order by cost; this class always does, see :mod:`data.resize`).
    """

    def __init__(self, scale_size: int | Sequence[int], size: Sequence[int],
                 interpolation: InterpolationMode | str = InterpolationMode.BICUBIC):
        self.scale_size = scale_size
        self.size = (int(size[0]), int(size[1]))
        self.resample = eval_resampling(getattr(interpolation, "value", interpolation))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of the image after the resize step, as torchvision computes it."""
        return resized_size(self.scale_size, width, height)

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_center_crop(image, self.scale_size, self.size, self.resample)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale_size={self.scale_size}, size={self.size}, resample={self.resample.name})"


class NormalizeImage:
    """A uint8 (C, H, W) tensor as :func:`normalize_batch` normalises it within a batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return normalize_batch(image[None], self.mean, self.std)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def build_inference_transform(data_config: dict[str, Any], normalize: bool = False) -> transforms.Compose:
    """The evaluation preprocessing of ``data_config``: PIL image -> uint8 tensor (C, H, W), to normalise in
    batches with :func:`normalize_batch`; with ``normalize``, the normalised float tensor of each image."""
    size = tuple(int(side) for side in data_config["input_size"][-2:])
    scale_size = eval_scale_size(size, data_config.get("crop_pct"), data_config.get("crop_mode"))
    steps: list = [ResizeCenterCrop(scale_size, size, data_config.get("interpolation") or "bicubic"),
                   transforms.PILToTensor()]
    if normalize:
        steps.append(NormalizeImage(data_config.get("mean", IMAGENET_DEFAULT_MEAN),
                                    data_config.get("std", IMAGENET_DEFAULT_STD)))
    return transforms.Compose(steps)


def normalize_batch(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A uint8 batch (N, C, H, W) from :func:`build_inference_transform` as float32 ``(x / 255 - mean) / std``,
    computed where the batch is (e.g. on the GPU after a uint8 copy). A float batch is returned unchanged."""
    if batch.is_floating_point():
        return batch
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(shape)
    return batch.float().div_(255).sub_(mean_t).div_(std_t)
