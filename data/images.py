"""The one image loader used everywhere (datasets, inference, tools) and the verification built on it."""

import os
import warnings
from collections.abc import Callable, Sequence
from typing import BinaryIO, cast

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "is_image_file",
    "load_image",
    "load_first_readable",
    "median_short_side",
    "to_rgb",
    "verify_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)

# Larger images are verified with bounded memory (see verify_image); smaller ones exactly as they are loaded.
VERIFY_FULL_PIXELS = 16_000_000

# How many following samples a dataset tries when an image cannot be read during an epoch.
MAX_SUBSTITUTE_TRIES = 32


class ImageLoadError(OSError):
    """An image that cannot be loaded; ``reason`` is a short ``"category: detail"`` text for reports."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def median_short_side(paths: Sequence[str | os.PathLike], limit: int = 256) -> int | None:
    """The median shorter side in pixels of up to ``limit`` of ``paths`` spread evenly (headers only; unreadable
    files are skipped); None when none can be read."""
    step = max(1, len(paths) // limit)
    sides = []
    for path in list(paths)[::step][:limit]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return int(np.median(sides)) if sides else None


def load_image(path_or_file: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open an image as an upright 8-bit RGB ``PIL.Image``, fully decoded and detached from the file.

    Applies the EXIF orientation, takes the first frame of animated images, scales 16-bit images to 8 bits,
    converts palette / grayscale / CMYK images to RGB and composites transparency onto a white background.
    Images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused (decompression-bomb limit).

    Raises:
        ImageLoadError: the file is missing, empty, not an image, truncated, corrupt or too large.
    """
    return cast(Image.Image, _decode(path_or_file, bounded=False))


def _decode(path_or_file: str | os.PathLike | BinaryIO, bounded: bool) -> Image.Image | None:
    """:func:`load_image`; with ``bounded``, an image over :data:`VERIFY_FULL_PIXELS` is only checked (returns
    None), decoding at most one copy in its stored mode: JPEGs at 1/8 scale (``draft``: every coefficient is still
    decoded), the others in full, their conversion to RGB tried on a corner."""
    name = os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else repr(path_or_file)
    try:
        with warnings.catch_warnings():
            # PIL only warns between the limit and twice the limit: that range is refused below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # quirks such as corrupt EXIF blocks are handled here; one warning per image would flood training logs
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path_or_file) as img:
                _check_pixel_limit(img)
                if bounded and img.width * img.height > VERIFY_FULL_PIXELS:
                    if img.format == "JPEG":
                        img.draft(None, (img.width // 8, img.height // 8))
                    img.load()
                    _to_rgb(img.crop((0, 0, min(img.width, 64), min(img.height, 64))))
                    return None
                img.load()
                _make_upright(img)
                return _to_rgb(img)
    except Exception as err:  # PIL raises many exception types on corrupt data
        raise ImageLoadError(name, _describe(err, path_or_file)) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """The conversions of :func:`load_image` for an image already in memory; ``image`` itself is not modified. An
    upright RGB image (what :func:`load_image` gives, e.g. a service's decoded upload) is returned as it is, not
    copied."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if image.mode == "RGB" and "transparency" not in image.info and orientation == 1:
            return image
        upright = ImageOps.exif_transpose(image)
    except Exception:  # an unreadable EXIF block: the image as stored
        upright = image
    return _to_rgb(upright)


def verify_image(path: str | os.PathLike) -> str | None:
    """Decode ``path`` as :func:`load_image` does; return the rejection reason, or None when it loads.

    Memory is bounded: an image over :data:`VERIFY_FULL_PIXELS` is decoded once in its stored mode (a JPEG at 1/8
    scale) instead of also being converted to RGB, so a near-limit image costs one copy (at most 4 bytes a pixel).
    """
    try:
        _decode(path, bounded=True)
    except ImageLoadError as err:
        return err.reason
    return None


def load_first_readable(
    index: int, num_samples: int, path_of: Callable[[int], str], warned: set[str]
) -> tuple[Image.Image, int]:
    """Load sample ``index``; when it is unreadable warn (once per file) and try the following samples.

    Lets a dataset survive files that break after its start-up scan: the batch still forms.
    Returns the image and the index actually used.
    """
    for offset in range(min(num_samples, MAX_SUBSTITUTE_TRIES)):
        current = (index + offset) % num_samples
        path = path_of(current)
        try:
            return load_image(path), current
        except ImageLoadError as err:
            if path not in warned:
                warned.add(path)
                print(f"warning: skipping unreadable image {path} ({err.reason}); using the next sample instead")
    raise ImageLoadError(
        path_of(index),
        f"unreadable: this and the next {MAX_SUBSTITUTE_TRIES - 1} images all failed to load; "
        "check that the dataset is still in place (re-run the scan by restarting)",
    )


def _check_pixel_limit(img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = img.width * img.height
    if limit is not None and pixels > limit:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} = {pixels} pixels is over the decompression-bomb limit of {limit} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS)"
        )


def _make_upright(img: Image.Image) -> None:
    """Apply the EXIF orientation in place; an unreadable EXIF block leaves the image as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _to_8bit_gray(img)
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer images are taken as 0..65535 and float images as 0..255; both become 8-bit "L"."""
    values = np.asarray(img)
    if img.mode == "F":
        gray = np.clip(values, 0, 255)
    else:
        gray = np.clip(values.astype(np.int64), 0, 65535) // 256
    return Image.fromarray(gray.astype(np.uint8), mode="L")


def _describe(err: Exception, path_or_file: str | os.PathLike | BinaryIO) -> str:
    """Turn an exception from opening/decoding an image into a short ``"category: detail"`` reason."""
    detail = str(err) or type(err).__name__
    if isinstance(path_or_file, (str, os.PathLike)):
        try:
            if os.path.getsize(path_or_file) == 0:
                return "empty file: 0 bytes"
        except OSError:
            pass
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"unreadable: {err.strerror or detail}"
    if isinstance(err, UnidentifiedImageError):
        return "not an image: the content is not a known image format"
    if isinstance(err, Image.DecompressionBombError):
        return f"too large: {detail}"
    if "truncated" in detail.lower():
        return f"truncated: {detail}"
    return f"corrupt: {type(err).__name__}: {detail}"

