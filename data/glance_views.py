"""Glance-and-focus crop geometry: the glance and focus views of an image, and crop boxes mapped back to
original-image pixels.

The focus image is the upright image (``data.images.load_image`` applies EXIF rotation) resized so its short side is
``focus_resolution`` (0: native size). Training and validation take a square ``focus_resolution`` window of it
(random or centred) so a batch stacks; inference reads the whole, possibly non-square, focus image. The glance is the
same region squashed to ``glance_size`` x ``glance_size`` by the evaluation preprocessing's resample
(:func:`data.resize.resize`; ``config.json`` records it as ``crop_mode`` squash at ``crop_pct`` 1). Boxes are
(x0, y0, x1, y1), x1/y1 exclusive.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import functional as TF

from data.resize import resize
from data.transforms import NormalizeImage
from model.glance_focus import crop_patches

__all__ = ["View", "make_view", "to_tensor", "to_original", "read_crop", "crop_patches"]


@dataclass
class View:
    """The glance and focus images of one image, and how focus pixels map back: ``orig = (focus + offset) / scale``."""

    glance: Image.Image
    focus: Image.Image
    scale: float
    offset: tuple[int, int]
    original_size: tuple[int, int]


def focus_scale(width: int, height: int, focus_resolution: int) -> float:
    """Factor that brings the short side to ``focus_resolution`` (1.0 for 0, the native size)."""
    return 1.0 if focus_resolution <= 0 else focus_resolution / min(width, height)


def make_view(image: Image.Image, glance_size: int, focus_resolution: int, window: str = "none") -> View:
    """Glance and focus images of ``image``; ``window``: ``none`` (whole image), ``center`` or ``random`` square."""
    scale = focus_scale(image.width, image.height, focus_resolution)
    size = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
    focus = image if size == image.size else image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    offset = (0, 0)
    if window != "none":
        side = min(focus.size)
        if window == "random":
            offset = (random.randint(0, focus.width - side), random.randint(0, focus.height - side))
        else:
            offset = ((focus.width - side) // 2, (focus.height - side) // 2)
        focus = focus.crop((offset[0], offset[1], offset[0] + side, offset[1] + side))
    glance = resize(focus, (glance_size, glance_size), Image.Resampling.BICUBIC)
    return View(glance, focus, scale, offset, image.size)


def to_tensor(image, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """A PIL image as a normalised (C, H, W) float tensor, normalised as the evaluation preprocessing does."""
    return NormalizeImage(mean, std)(TF.pil_to_tensor(image))



def to_original(boxes: torch.Tensor, view: View) -> list[list[int]]:
    """Boxes (..., 4) in focus pixels as ``[x0, y0, x1, y1]`` lists in original-image pixels, inside the image."""
    width, height = view.original_size
    out = []
    for x0, y0, x1, y1 in boxes.reshape(-1, 4).tolist():
        box = [(x0 + view.offset[0]) / view.scale, (y0 + view.offset[1]) / view.scale,
               (x1 + view.offset[0]) / view.scale, (y1 + view.offset[1]) / view.scale]
        out.append([min(max(round(v), 0), limit) for v, limit in zip(box, (width, height, width, height), strict=True)])
    return out


def read_crop(focus: torch.Tensor, centre: tuple[float, float], size: int) -> tuple[torch.Tensor, list[int]]:
    """One ``size`` x ``size`` crop of a (C, H, W) focus tensor at a centre in [0, 1]^2, and its box in focus pixels."""
    patches, boxes = crop_patches(focus[None], torch.tensor([centre], dtype=torch.float32), size)
    return patches[0], boxes[0].tolist()
