"""A test world where only fine texture identifies the artist (for glance-and-focus experiments).

    python tools/make_texture_world.py --output texture_world --artists 4 --train 60 --val 20 --size 700 1000

Every image is a random composition of coloured shapes on a smooth background, drawn independently of the artist.
Inside the shapes the artist leaves a low-contrast texture of 2-3 px period (lines, a checkerboard, dots; no two
alike after a horizontal flip, the training augmentation), at a random phase. Shrunk to 224 px the texture averages
away, so a plain model at low resolution is at chance; crops at native resolution show it.
Writes ``train/`` and ``val/`` (one folder per artist) and ``class_mapping.csv``, as ``prepare_dataset.py`` does.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from data.class_mapping import CLASS_MAPPING_FILE, write_class_mapping
from utils import UserError, run_cli

__all__ = ["TEXTURES", "render_image", "make_texture_world", "main"]


def _lines(yy: np.ndarray, xx: np.ndarray, dy: int, dx: int, period: int) -> np.ndarray:
    on = (yy * dy + xx * dx) % period == 0
    return np.where(on, period - 1.0, -1.0) / (period - 1)  # zero mean over a period


TEXTURES = {  # the artist's signature: a zero-mean pattern of period 2 or 3
    "horizontal": lambda yy, xx: _lines(yy, xx, 1, 0, 2),
    "vertical": lambda yy, xx: _lines(yy, xx, 0, 1, 2),
    "checker": lambda yy, xx: _lines(yy, xx, 1, 1, 2),
    "diagonal": lambda yy, xx: _lines(yy, xx, 1, 1, 3),
    "dots": lambda yy, xx: np.minimum(_lines(yy, xx, 1, 0, 3), _lines(yy, xx, 0, 1, 3)) + 1 / 3,
    "grid": lambda yy, xx: np.maximum(_lines(yy, xx, 1, 0, 3), _lines(yy, xx, 0, 1, 3)) - 1 / 3,
}


def _composition(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth two-colour background with 4-8 filled ellipses: the RGB image (float) and the shapes' mask."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / width) * np.cos(angle) + (yy / height) * np.sin(angle) + 1) / 2
    img = c0 + (c1 - c0) * ramp[..., None]
    mask = np.zeros((height, width), bool)
    for _ in range(rng.integers(4, 9)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.08, 0.25) * height, rng.uniform(0.08, 0.25) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img[inside] = rng.uniform(50, 205, 3)
        mask |= inside
    return img, mask


def render_image(rng: np.random.Generator, texture: str, width: int, height: int, amplitude: float = 12.0,
                 everywhere: bool = False) -> Image.Image:
    """One image: a random composition, the ``texture`` (``amplitude`` grey levels) inside its shapes (or
    ``everywhere``), mild noise."""
    img, mask = _composition(rng, height, width)
    mask |= everywhere
    yy, xx = np.mgrid[0:height, 0:width]
    pattern = TEXTURES[texture](yy + rng.integers(0, 6), xx + rng.integers(0, 6))
    img += (amplitude * pattern * mask)[..., None]
    img += rng.normal(0, 3.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def make_texture_world(root: str | Path, artists: int = 4, train: int = 60, val: int = 20,
                       size: tuple[int, int] = (700, 1000), seed: int = 0, amplitude: float = 12.0,
                       everywhere: bool = False) -> list[str]:
    """Write ``root/train`` and ``root/val`` (``train``/``val`` PNGs per artist, sides in ``size``); return names."""
    if not 2 <= artists <= len(TEXTURES):
        raise UserError(f"--artists must be between 2 and {len(TEXTURES)}")
    names = [f"artist_{name}" for name in list(TEXTURES)[:artists]]
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name, texture in zip(names, TEXTURES, strict=False):
            folder = Path(root, split, name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
                render_image(rng, texture, width, height, amplitude, everywhere).save(folder / f"{i:04d}.png")
    write_class_mapping(Path(root) / CLASS_MAPPING_FILE, names)
    return names


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_texture_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write train/, val/ and class_mapping.csv into")
    parser.add_argument("--artists", type=int, default=4)
    parser.add_argument("--train", type=int, default=60, help="training images per artist")
    parser.add_argument("--val", type=int, default=20, help="validation images per artist")
    parser.add_argument("--size", type=int, nargs=2, default=(700, 1000), metavar=("MIN", "MAX"),
                        help="range of the image sides in pixels (each side drawn independently)")
    parser.add_argument("--amplitude", type=float, default=12.0, help="texture contrast in grey levels")
    parser.add_argument("--everywhere", action="store_true",
                        help="texture over the whole image, not only inside the shapes (easier to learn)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace | None = None) -> None:
    args = args if args is not None else get_args_parser().parse_args()
    names = make_texture_world(args.output, args.artists, args.train, args.val, tuple(args.size), args.seed,
                               args.amplitude, args.everywhere)
    print(f"{len(names)} artists, {args.train} train and {args.val} val images each, in {args.output}")


if __name__ == "__main__":
    run_cli(main)
