"""The pixel step of the evaluation preprocessing, without torch: resize + center crop as PIL resamples.

One implementation for every path that evaluates a model: training's validation and inference
(:mod:`data.transforms` wraps it), exported ONNX folders (:mod:`inference.onnx_model`, numpy only) and the glance of
glance-and-focus. The geometry is timm's eval transform's (resize the short side to ``floor(size / crop_pct)``, or
squash both sides to it, then center-crop ``size``), at the same sampling positions and with the same filter.

:func:`resize` always runs PIL's horizontal pass first, then its vertical pass. ``Image.resize`` itself picks the
order by cost (the vertical pass first when that is cheaper for the output size), and the uint8 rounding and the
clipping of bicubic overshoot between the two passes depend on the order: resampling only the region a crop keeps
could then take the other order than resizing the whole image, and pixels next to sharp edges differed by up to
about 20 grey levels. With the order fixed, the result no longer depends on the region resampled.
"""

import math
from collections.abc import Sequence

from PIL import Image

from errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*, torch-free
EVAL_CROP_PCT = 0.875  # resize the short side to input_size / 0.875 (256 for 224), then center-crop
EVAL_CROP_MODES = ("center", "squash")
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0, Image.Resampling.LANCZOS: 3.0,
            Image.Resampling.BOX: 0.5, Image.Resampling.HAMMING: 1.0}  # Pillow's filter supports, in input pixels


def resized_size(scale_size: int | Sequence[int], width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` after torchvision's ``Resize(scale_size)`` (an int: the short side, aspect ratio kept)."""
    if isinstance(scale_size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = scale_size, int(scale_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return int(scale_size[1]), int(scale_size[0])


def resize(image: Image.Image, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BICUBIC,
           box: Sequence[float] | None = None) -> Image.Image:
    """``image.resize(size, resample, box)`` with the horizontal pass always first (see the module docstring).

    Only the rows the vertical pass reads go through the horizontal pass.
    """
    x0, y0, x1, y1 = box if box is not None else (0, 0, image.width, image.height)
    width, height = size
    support = _SUPPORT[resample] * max((y1 - y0) / height, 1.0)
    top, bottom = max(math.floor(y0 - support) - 1, 0), min(math.ceil(y1 + support) + 1, image.height)
    rows = image if (top, bottom) == (0, image.height) else image.crop((0, top, image.width, bottom))
    wide = rows.resize((width, rows.height), resample, box=(x0, 0, x1, rows.height))
    return wide.resize((width, height), resample, box=(0, y0 - top, width, y1 - top))


def _pad_and_crop(image: Image.Image, crop_w: int, crop_h: int) -> Image.Image:
    """torchvision's ``CenterCrop`` of an image smaller than the crop: zero padding around it, then the crop."""
    width, height = image.size
    pad_left, pad_top = max(crop_w - width, 0) // 2, max(crop_h - height, 0) // 2
    canvas = Image.new(image.mode, (max(width, crop_w), max(height, crop_h)))
    canvas.paste(image, (pad_left, pad_top))
    left = int(round((canvas.width - crop_w) / 2.0))
    top = int(round((canvas.height - crop_h) / 2.0))
    return canvas.crop((left, top, left + crop_w, top + crop_h))


def resize_center_crop(image: Image.Image, scale_size: int | Sequence[int], size: Sequence[int],
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """``Resize(scale_size)`` then ``CenterCrop(size)`` (``size`` is ``(height, width)``), resampling only the
    region the crop keeps (the same sampling positions and filter as the two steps)."""
    width, height = image.size
    resized_w, resized_h = resized_size(scale_size, width, height)
    crop_h, crop_w = int(size[0]), int(size[1])
    if crop_w > resized_w or crop_h > resized_h:  # CenterCrop would pad: keep the two steps
        return _pad_and_crop(resize(image, (resized_w, resized_h), resample), crop_w, crop_h)
    left = int(round((resized_w - crop_w) / 2.0))
    top = int(round((resized_h - crop_h) / 2.0))
    scale_x, scale_y = width / resized_w, height / resized_h
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    return resize(image, (crop_w, crop_h), resample, box)


def eval_scale_size(size: Sequence[int], crop_pct: float | None = None,
                    crop_mode: str | None = None) -> int | tuple[int, int]:
    """What timm's eval transform resizes to before its center crop of ``size`` (``(height, width)``): the short
    side ``floor(size / crop_pct)`` (an int), or with ``crop_mode="squash"`` both sides (a tuple)."""
    crop_pct = float(crop_pct or EVAL_CROP_PCT)
    crop_mode = crop_mode or "center"
    if crop_mode not in EVAL_CROP_MODES:
        raise UserError(f"crop_mode {crop_mode!r} is not supported by the evaluation preprocessing; use one of "
                        f"{', '.join(EVAL_CROP_MODES)} in config.json")
    scaled = tuple(math.floor(side / crop_pct) for side in size)
    if crop_mode == "squash" or scaled[0] != scaled[1]:
        return scaled
    return scaled[0]


def eval_resampling(interpolation: str | None) -> Image.Resampling:
    """The PIL filter of an ``interpolation`` name (default bicubic)."""
    name = str(interpolation or "bicubic")
    if name not in RESAMPLING:
        raise UserError(f"interpolation {name!r} is not supported by the evaluation preprocessing; use one of "
                        f"{', '.join(RESAMPLING)} in config.json")
    return RESAMPLING[name]


def eval_resize_crop(image: Image.Image, size: Sequence[int], crop_pct: float | None = None,
                     crop_mode: str | None = None, interpolation: str | None = None) -> Image.Image:
    """The pixel step of the evaluation preprocessing: ``image`` resized and center-cropped to ``size``
    (``(height, width)``) as a data config's ``crop_pct``, ``crop_mode`` and ``interpolation`` say."""
    return resize_center_crop(image, eval_scale_size(size, crop_pct, crop_mode), size, eval_resampling(interpolation))
