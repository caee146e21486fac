"""Resize + center crop as one PIL resample, without torch (the PyTorch transform and the ONNX path share it)."""

from collections.abc import Sequence

from PIL import Image


def resized_size(scale_size: int | Sequence[int], width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` after torchvision's ``Resize(scale_size)`` (an int: the short side, aspect ratio kept)."""
    if isinstance(scale_size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = scale_size, int(scale_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return int(scale_size[1]), int(scale_size[0])


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
    """``Resize(scale_size)`` then ``CenterCrop(size)`` (``size`` is ``(height, width)``) as one PIL resample.

    PIL's ``box`` resamples only the region the crop keeps, at the same sampling positions and with the same filter
    as the two steps (see :class:`data.transforms.ResizeCenterCrop` for the rounding differences).
    """
    width, height = image.size
    resized_w, resized_h = resized_size(scale_size, width, height)
    crop_h, crop_w = int(size[0]), int(size[1])
    if crop_w > resized_w or crop_h > resized_h:  # CenterCrop would pad: keep the two steps
        return _pad_and_crop(image.resize((resized_w, resized_h), resample), crop_w, crop_h)
    left = int(round((resized_w - crop_w) / 2.0))
    top = int(round((resized_h - crop_h) / 2.0))
    scale_x, scale_y = width / resized_w, height / resized_h
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    return image.resize((crop_w, crop_h), resample, box=box)
