"""Small generated images for tests: valid ones of every awkward kind, and broken ones.

Every helper writes one file at ``path`` (parent folders are created) and returns the path.
"""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def noise_image(path, size: tuple[int, int] = (32, 24), seed: int = 0, fmt: str | None = None) -> Path:
    """Random RGB noise (distinct per ``seed``), saved in the format of the extension (or ``fmt``)."""
    path = _prepare(path)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format=fmt)
    return path


def artist_folders(root, counts: dict[str, int], size: tuple[int, int] = (32, 24)) -> Path:
    """``root/<artist>/img_000.png ...`` with ``counts[artist]`` valid noise images each."""
    for a, (artist, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            noise_image(Path(root, artist, f"img_{i:03d}.png"), size, seed=1000 * a + i)
    return Path(root)


def truncated_jpeg(path) -> Path:
    """A JPEG cut off in the middle of its image data."""
    path = noise_image(path, (64, 64), fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty_file(path) -> Path:
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def text_file(path, text: str = "this is not an image\n") -> Path:
    path = _prepare(path)
    path.write_text(text)
    return path


def cmyk_jpeg(path, cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> Path:
    """A flat CMYK JPEG (the default colour is red)."""
    path = _prepare(path)
    Image.new("CMYK", (32, 32), cmyk).save(path, quality=95)
    return path


def gray16_png(path, value: int = 32768) -> Path:
    """A flat 16-bit grayscale PNG (PIL mode I;16); 32768 is mid-gray."""
    path = _prepare(path)
    Image.fromarray(np.full((24, 32), value, dtype=np.uint16)).save(path)
    return path


def rgb16_png(path, rgb: tuple[int, int, int] = (65535, 32768, 0)) -> Path:
    """A flat 48-bit (16 bits per channel) RGB PNG, written by hand since PIL cannot save one."""
    width, height = 8, 4
    row = b"\x00" + struct.pack(">HHH", *rgb) * width
    return _write_png(path, width, height, bit_depth=16, color_type=2, data=zlib.compress(row * height))


def bomb_png(path, side: int = 30000) -> Path:
    """A PNG header claiming ``side`` x ``side`` pixels (over the decompression-bomb limit), with tiny data."""
    return _write_png(path, side, side, bit_depth=8, color_type=0, data=zlib.compress(b"\x00" * 64))


def palette_transparent_png(path) -> Path:
    """Palette PNG: left half index 0 (black, fully transparent), right half index 1 (opaque red)."""
    path = _prepare(path)
    img = Image.new("P", (32, 16), 0)
    img.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    img.paste(1, (16, 0, 32, 16))
    img.save(path, transparency=0)
    return path


def rgba_png(path, alpha: int = 0, mode: str = "RGBA") -> Path:
    """Black pixels with ``alpha`` (0 = fully transparent) as RGBA, or as LA with ``mode="LA"``."""
    path = _prepare(path)
    color = (0, alpha) if mode == "LA" else (0, 0, 0, alpha)
    Image.new(mode, (16, 16), color).save(path)
    return path


def exif_rotated_jpeg(path) -> Path:
    """Stored 40x20, left half red and right half blue, with EXIF orientation 6 (display rotated 90 degrees
    clockwise): upright it is 20x40 with red on top and blue below."""
    path = _prepare(path)
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def animated_gif(path) -> Path:
    """Two frames: red then blue."""
    path = _prepare(path)
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _write_png(path, width: int, height: int, bit_depth: int, color_type: int, data: bytes) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = _prepare(path)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path
