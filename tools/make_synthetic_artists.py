#!/usr/bin/env python3
"""Generate a synthetic artist-style dataset: every artist is a rendering style applied to random content.

Each artist paints the same kind of random compositions (overlapping shapes, sometimes a horizon), so content
cannot tell artists apart; what differs is the style: palette family, fill pattern (hatching, halftone, stipple,
brush dabs, mosaic, waves, flat washes), stroke direction and spacing, outline weight, blur, pixelation, dithering,
grain and paper texture. Each style differs from the others in several of these cues at once, so it survives low
resolution, random crops, flips and colour jitter.

Written layout (the raw ``source_dir/<artist>/...`` layout)::

    output_dir/<artist>/0000.jpg ...          # JPEG (quality 90), every 10th image a PNG
    output_dir/mixed/0000.jpg ...             # --mix only: two styles blended over the same content
    output_dir/mixed/0000.txt ...             # --mix only: its labels, e.g. "(Ink Hatcher:0.75),(pixel-8bit:0.25)"
    output_dir/mixed_labels.csv               # --mix only: image_path,labels with "(artist:weight),..." labels

Styles depend only on the artist index, so datasets made with different seeds share their artists (a seed-1
set is a held-out test set for a model trained on a seed-0 set); the seed picks the content and stroke noise.
The same seed gives byte-identical files.
"""

import argparse
import colorsys
import csv
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data.multilabel import format_labels
from utils import UserError, run_cli

FILLS = ("flat", "hatch", "crosshatch", "halftone", "stipple", "dabs", "mosaic", "waves")
# Stroke directions live in [0, 90] degrees: a horizontal or vertical flip maps an angle a to 180 - a, so no two
# artists can be made to look alike by the flips used in training augmentation.
ANGLES = (0.0, 22.5, 45.0, 67.5, 90.0)
MIX_ALPHAS = (0.25, 0.5, 0.75)
MIXED_DIR = "mixed"
MIXED_CSV = "mixed_labels.csv"
_STYLE_SALT = 0x5A17  # parameterised styles are seeded by artist index only
_MIX_SALT = 0x313C
_REFERENCE_SIZE = 256  # style lengths (spacing, stroke, outline, blur, pixel) are given at this size


@dataclass(frozen=True)
class Style:
    """Rendering parameters of one artist; lengths are in pixels at 256 px and scale with the image size."""

    name: str
    hues: tuple[float, ...]  # palette hues in [0, 1); each region picks one and jitters it
    hue_jitter: float
    sat: tuple[float, float]
    val: tuple[float, float]
    paper: tuple[float, float, float]  # background colour, RGB in [0, 1]
    ink: tuple[float, float, float]  # colour of outlines, hatching, grout
    fill: str  # one of FILLS
    angle: float = 0.0  # stroke direction in degrees, one of ANGLES
    spacing: float = 10.0  # pattern period
    stroke: float = 2.0  # stroke width of hatching and dabs, dot radius of stipple
    outline: int = 0  # outline width, 0 for none
    blur: float = 0.0  # Gaussian blur radius (watercolour washes)
    texture: float = 0.0  # amplitude of low-frequency paper texture
    pixel: int = 1  # pixel-art block size, 1 for none
    levels: int = 0  # ordered-dither levels per channel, 0 for none
    grain: float = 0.0  # standard deviation of monochrome noise


_LIGHT_PAPER = (0.97, 0.95, 0.90)
_HAND_STYLES = (
    Style("Ink Hatcher", (0.08,), 0.02, (0.10, 0.30), (0.55, 0.95), _LIGHT_PAPER, (0.15, 0.10, 0.08), "hatch",
          angle=45.0, spacing=9.0, stroke=2.5, outline=3, grain=0.03),
    Style("点彩画家", (0.02, 0.10), 0.04, (0.65, 1.0), (0.75, 1.0), (1.0, 0.98, 0.92), (0.3, 0.1, 0.05), "stipple",
          spacing=8.0, stroke=3.0),
    Style("水彩の森", (0.45, 0.55), 0.04, (0.25, 0.55), (0.70, 0.95), _LIGHT_PAPER, (0.30, 0.45, 0.42), "flat",
          outline=3, blur=3.5, texture=0.25, grain=0.02),
    Style("Pop Halftone", (0.0, 0.15, 0.62), 0.01, (0.9, 1.0), (0.85, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
          "halftone", spacing=10.0, outline=5),
    Style("ochre_cubist", (0.08,), 0.04, (0.35, 0.75), (0.45, 0.95), (0.30, 0.24, 0.16), (0.2, 0.15, 0.1), "mosaic",
          angle=22.5, spacing=18.0, stroke=2.0, outline=2),
    Style("pixel-8bit", (0.72, 0.50), 0.05, (0.6, 1.0), (0.5, 1.0), (0.10, 0.10, 0.20), (0.95, 0.95, 1.0), "flat",
          pixel=8, levels=3),
    Style("Neon Nocturne", (0.85, 0.50), 0.04, (0.8, 1.0), (0.85, 1.0), (0.04, 0.03, 0.08), (0.2, 1.0, 0.9), "waves",
          angle=67.5, spacing=11.0, outline=2),
    Style("Impasto Dabs", (0.60, 0.14), 0.04, (0.35, 0.65), (0.75, 1.0), (0.85, 0.85, 0.80), (0.2, 0.2, 0.3), "dabs",
          angle=0.0, spacing=7.0, stroke=5.0, blur=0.8),
)
_BAYER4 = (np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], np.float32) + 0.5) / 16 - 0.5


@dataclass(frozen=True)
class Content:
    """What is painted, independent of style: a region label map and per-region random tones in [0, 1)."""

    labels: np.ndarray  # (size, size) uint8, 0 is the background
    tones: np.ndarray  # (num_regions, 3): hue choice, saturation and value positions within the palette


def artist_names(num_artists: int) -> list[str]:
    """Names of the first ``num_artists`` artists: eight hand-designed styles, then ``artist_009`` and so on."""
    return [make_style(i).name for i in range(num_artists)]


def make_style(index: int) -> Style:
    """The style of artist ``index``: hand-designed for the first eight, seeded parameter combinations after."""
    if index < 0:
        raise ValueError(f"artist index {index} is negative")
    if index < len(_HAND_STYLES):
        return _HAND_STYLES[index]
    rng = np.random.default_rng([_STYLE_SALT, index])
    dark_paper = rng.random() < 0.3
    paper = tuple(rng.uniform(0.0, 0.15, 3)) if dark_paper else tuple(rng.uniform(0.85, 1.0, 3))
    ink = tuple(rng.uniform(0.8, 1.0, 3)) if dark_paper else tuple(rng.uniform(0.0, 0.25, 3))
    return Style(
        name=f"artist_{index + 1:03d}",
        hues=tuple(float(h) for h in rng.random(int(rng.integers(1, 4)))),
        hue_jitter=float(rng.uniform(0.02, 0.08)),
        sat=((0.1, 0.35), (0.35, 0.7), (0.7, 1.0))[rng.integers(3)],
        val=((0.3, 0.6), (0.55, 0.85), (0.8, 1.0))[rng.integers(3)],
        paper=tuple(float(c) for c in paper),
        ink=tuple(float(c) for c in ink),
        # Cycle fill and angle so that any run of artists covers them evenly.
        fill=FILLS[index % len(FILLS)],
        angle=ANGLES[(index // len(FILLS)) % len(ANGLES)],
        spacing=float(rng.uniform(7.0, 16.0)),
        stroke=float(rng.uniform(1.5, 4.0)),
        outline=int(rng.choice([0, 0, 2, 4])),
        blur=float(rng.choice([0.0, 0.0, 0.0, 1.5, 3.0])),
        texture=float(rng.choice([0.0, 0.0, 0.2])),
        pixel=int(rng.choice([1, 1, 1, 1, 5, 8])),
        levels=int(rng.choice([0, 0, 0, 3, 4])),
        grain=float(rng.uniform(0.0, 0.05)),
    )


def make_content(rng: np.random.Generator, size: int) -> Content:
    """Random composition: an optional wavy horizon and 3-8 overlapping ellipses, boxes and polygons."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    label = 1
    if rng.random() < 0.5:
        xs = np.linspace(0, size, 9)
        ys = size * (rng.uniform(0.45, 0.8) + rng.uniform(-0.06, 0.06, xs.size))
        draw.polygon([*np.stack([xs, ys], 1).ravel().tolist(), size, size, 0, size], fill=label)
        label += 1
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.06, 0.3, 2) * size
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=label)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=label)
        else:  # triangle-to-heptagon, regular (kind 2) or irregular star-like (kind 3)
            n = int(rng.integers(3, 8))
            t = np.sort(rng.uniform(0, 2 * np.pi, n)) if kind == 3 else np.arange(n) * 2 * np.pi / n + rng.uniform(0, 6)
            r = rng.uniform(0.5, 1.0, n) if kind == 3 else np.ones(n)
            draw.polygon(np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1).ravel().tolist(), fill=label)
        label += 1
    return Content(np.asarray(canvas), rng.random((label, 3)))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _rotate(size: int, angle: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Pixel coordinates in a frame rotated by ``angle``: u runs along the strokes, v across them."""
    x, y = _grid(size)
    c, s = float(np.cos(np.deg2rad(angle))), float(np.sin(np.deg2rad(angle)))
    return x * c + y * s, y * c - x * s, c, s


def _palette(content: Content, style: Style) -> np.ndarray:
    """RGB colour of every region: the background gets the paper colour, other regions palette colours."""
    colours = np.empty((len(content.tones), 3), np.float32)
    colours[0] = style.paper
    for i, (h, s, v) in enumerate(content.tones[1:], start=1):
        base = style.hues[int(h * len(style.hues))]
        hue = (base + (h * len(style.hues) % 1 - 0.5) * 2 * style.hue_jitter) % 1.0
        colours[i] = colorsys.hsv_to_rgb(hue, np.interp(s, (0, 1), style.sat), np.interp(v, (0, 1), style.val))
    return colours


def _luminance(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def _cells(img: np.ndarray, u: np.ndarray, v: np.ndarray, cos: float, sin: float, cell_u: float, cell_v: float,
           rng: np.random.Generator, jitter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the rotated frame into staggered cells with randomly jittered centres.

    Returns each pixel's offset from its cell centre along u and v, and the image colour at that centre with a
    random per-cell brightness change of up to ``jitter``.
    """
    size = img.shape[0]
    iv = np.floor(v / cell_v).astype(np.int32)
    row = iv - iv.min()
    shift = rng.uniform(0, cell_u, row.max() + 1).astype(np.float32)[row]  # stagger rows like brickwork
    iu = np.floor((u + shift) / cell_u).astype(np.int32)
    col = iu - iu.min()
    cell = col * (row.max() + 1) + row  # flat cell index of every pixel
    count = cell.max() + 1
    cu = (iu + 0.5 + rng.uniform(-0.2, 0.2, count).astype(np.float32)[cell]) * cell_u - shift
    cv = (iv + 0.5 + rng.uniform(-0.2, 0.2, count).astype(np.float32)[cell]) * cell_v
    x = np.clip(np.rint(cu * cos - cv * sin), 0, size - 1).astype(np.int32)
    y = np.clip(np.rint(cu * sin + cv * cos), 0, size - 1).astype(np.int32)
    gain = 1 + rng.uniform(-jitter, jitter, count).astype(np.float32)[cell]
    return u - cu, v - cv, img[y, x] * gain[..., None]


def _fill(img: np.ndarray, style: Style, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Apply the style's fill pattern to the flat-coloured image."""
    if style.fill == "flat":
        return img
    size = img.shape[0]
    spacing, stroke = style.spacing * scale, style.stroke * scale
    ink = np.array(style.ink, np.float32)
    u, v, cos, sin = _rotate(size, style.angle)
    u = u + rng.uniform(0, spacing)  # random pattern phase
    v = v + rng.uniform(0, spacing)
    lum = _luminance(img)
    if style.fill in ("hatch", "crosshatch"):
        width = stroke * (0.5 + (1 - lum))  # darker tones get heavier lines
        mask = (u % spacing) < width
        if style.fill == "crosshatch":
            mask |= (v % spacing) < width
        return img + (ink - img) * (0.75 * mask[..., None])
    if style.fill == "halftone":
        du, dv = u % spacing - spacing / 2, v % spacing - spacing / 2
        dots = np.hypot(du, dv) < spacing * 0.55 * np.sqrt(np.clip(1.1 - lum, 0.05, 1.0))
        return np.where(dots[..., None], img * 0.85, img + (1 - img) * 0.65)
    if style.fill == "waves":
        phase = 2 * np.pi * (u + spacing * 0.6 * np.sin(2 * np.pi * v / (5 * spacing))) / spacing
        return img * (0.65 + 0.35 * np.sin(phase))[..., None]
    if style.fill == "stipple":  # round dots on paper, no orientation
        du, dv, colour = _cells(img, u, v, cos, sin, spacing, spacing, rng, 0.15)
        dot = np.hypot(du, dv) < stroke
        return np.where(dot[..., None], colour, img * 0.25 + np.array(style.paper, np.float32) * 0.75)
    if style.fill == "dabs":  # elongated brush marks along the stroke direction over a darkened underpainting
        length = spacing * 2.5
        du, dv, colour = _cells(img, u, v, cos, sin, length, stroke, rng, 0.2)
        dab = (du / (length * 0.48)) ** 2 + (dv / (stroke * 0.6)) ** 2 < 1
        return np.where(dab[..., None], colour, img * 0.6)
    if style.fill == "mosaic":  # flat tiles with grout lines in ink
        du, dv, colour = _cells(img, u, v, cos, sin, spacing, spacing, rng, 0.12)
        grout = np.maximum(np.abs(du), np.abs(dv)) > spacing / 2 - max(stroke / 2, 0.75)
        return np.where(grout[..., None], ink, colour)
    raise ValueError(f"unknown fill {style.fill!r}")


def _outline(labels: np.ndarray, width: int) -> np.ndarray:
    """Mask of region borders about ``width`` pixels thick (split across the two sides of each border)."""
    mask = np.zeros(labels.shape, bool)
    for d in range(1, (width + 1) // 2 + 1):
        diff_x, diff_y = labels[:, d:] != labels[:, :-d], labels[d:] != labels[:-d]
        mask[:, :-d] |= diff_x
        mask[:-d] |= diff_y
        if d <= width // 2:
            mask[:, d:] |= diff_x
            mask[d:] |= diff_y
    return mask


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))


def render(content: Content, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Paint ``content`` in ``style``; returns a float32 (size, size, 3) image in [0, 1]."""
    size = content.labels.shape[0]
    scale = size / _REFERENCE_SIZE
    img = _fill(_palette(content, style)[content.labels], style, rng, scale)
    if style.outline:
        edges = _outline(content.labels, max(1, round(style.outline * scale)))
        img = np.where(edges[..., None], np.array(style.ink, np.float32), img)
    if style.blur:
        img = np.asarray(_to_pil(img).filter(ImageFilter.GaussianBlur(style.blur * scale)), np.float32) / 255
    if style.texture:
        noise = Image.fromarray(rng.random((8, 8)).astype(np.float32)).resize((size, size), Image.BICUBIC)
        img = img * (1 + style.texture * (np.asarray(noise) - 0.5))[..., None]
    block = max(1, round(style.pixel * scale))
    if block > 1 or style.levels:
        small = _to_pil(img).resize((size // block,) * 2, Image.BOX) if block > 1 else _to_pil(img)
        img = np.asarray(small, np.float32) / 255
        if style.levels:
            h, w = img.shape[:2]
            bayer = np.tile(_BAYER4, (h // 4 + 1, w // 4 + 1))[:h, :w, None]
            img = np.clip(np.floor(img * (style.levels - 1) + 0.5 + bayer), 0, style.levels - 1) / (style.levels - 1)
        if block > 1:
            img = np.asarray(_to_pil(img).resize((size, size), Image.NEAREST), np.float32) / 255
    if style.grain:
        img = img + rng.normal(0, style.grain, (size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _file_name(index: int) -> str:
    return f"{index:04d}.png" if index % 10 == 9 else f"{index:04d}.jpg"


def _save(img: np.ndarray, path: Path) -> None:
    if path.suffix == ".png":
        _to_pil(img).save(path)
    else:
        _to_pil(img).save(path, quality=90)


def _write_mixed(output_dir: Path, styles: list[Style], size: int, seed: int, count: int) -> Path:
    """Write ``count`` images to ``mixed/`` (every 4th a pure style, the rest two-style blends) and their labels.

    Labels go both into one CSV and into a ``.txt`` beside each image (the layout
    ``tools/generate_multilabel_csv.py`` and ``tools/split_multilabel_dataset.py`` read).
    """
    (output_dir / MIXED_DIR).mkdir(exist_ok=True)
    rows = []
    for j in range(count):
        rng = np.random.default_rng([seed, _MIX_SALT, j])
        content = make_content(rng, size)
        if j % 4 == 3:
            a = int(rng.integers(len(styles)))
            img, labels = render(content, styles[a], rng), [(styles[a].name, 1.0)]
        else:
            a, b = (int(i) for i in rng.choice(len(styles), 2, replace=False))
            alpha = MIX_ALPHAS[rng.integers(len(MIX_ALPHAS))]
            img = alpha * render(content, styles[a], rng) + (1 - alpha) * render(content, styles[b], rng)
            labels = sorted([(styles[a].name, alpha), (styles[b].name, 1 - alpha)], key=lambda t: -t[1])
        rel = f"{MIXED_DIR}/{_file_name(j)}"
        _save(img, output_dir / rel)
        label_text = format_labels(dict(labels))
        (output_dir / rel).with_suffix(".txt").write_text(label_text + "\n", encoding="utf-8")
        rows.append((rel, label_text))
    csv_path = output_dir / MIXED_CSV
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image_path", "labels"))
        writer.writerows(rows)
    return csv_path


def generate_artists(
    output_dir: str | Path,
    num_artists: int = 8,
    images_per_artist: int = 60,
    size: int = 256,
    seed: int = 0,
    mix: bool = False,
    num_mixed: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic dataset to ``output_dir/<artist>/`` (and ``mixed/`` plus a CSV with ``mix``).

    ``num_mixed`` defaults to half the number of single-artist images. Returns ``output_dir``, ``artists``
    (names in artist-index order), ``counts`` (images per artist), ``csv_path`` (None without ``mix``) and
    ``num_mixed`` (0 without ``mix``).
    """
    if num_artists < 1 or images_per_artist < 1:
        raise UserError("--num-artists and --images-per-artist must be at least 1")
    if size < 32:
        raise UserError(f"--size {size} is too small to show a style; use at least 32")
    if seed < 0:
        raise UserError(f"--seed {seed} is negative; use a seed >= 0")
    num_mixed = num_artists * images_per_artist // 2 if num_mixed is None else num_mixed
    if mix and num_artists < 2:
        raise UserError("--mix blends two artists; use --num-artists 2 or more")
    if mix and num_mixed < 1:
        raise UserError(f"--num-mixed {num_mixed} must be at least 1")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output dir {out} is not empty; choose a new directory or pass --overwrite")
    styles = [make_style(i) for i in range(num_artists)]
    for a, style in enumerate(styles):
        artist_dir = out / style.name
        artist_dir.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_artist):
            rng = np.random.default_rng([seed, a, i])
            _save(render(make_content(rng, size), style, rng), artist_dir / _file_name(i))
    csv_path = _write_mixed(out, styles, size, seed, num_mixed) if mix else None
    return {
        "output_dir": out,
        "artists": [s.name for s in styles],
        "counts": {s.name: images_per_artist for s in styles},
        "csv_path": csv_path,
        "num_mixed": num_mixed if mix else 0,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="where to write <artist>/ folders (must be empty)")
    parser.add_argument("--num-artists", type=int, default=8, help="number of artists (styles); any number works")
    parser.add_argument("--images-per-artist", type=int, default=60)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="content seed; the same seed gives identical files")
    parser.add_argument("--mix", action="store_true",
                        help=f"also write {MIXED_DIR}/ with two-style blends and {MIXED_CSV} (multi-label)")
    parser.add_argument("--num-mixed", type=int, default=None,
                        help="number of images in mixed/ (default: half the single-artist images)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output dir")
    return parser


def main(args: argparse.Namespace | None = None) -> dict:
    args = args if args is not None else get_args_parser().parse_args()
    start = time.perf_counter()
    result = generate_artists(args.output_dir, args.num_artists, args.images_per_artist, args.size, args.seed,
                              args.mix, args.num_mixed, args.overwrite)
    total = sum(result["counts"].values()) + result["num_mixed"]
    print(f"wrote {total} images of {len(result['artists'])} artists to {result['output_dir']} "
          f"in {time.perf_counter() - start:.1f}s")
    if result["csv_path"] is not None:
        print(f"multi-label CSV: {result['csv_path']} ({result['num_mixed']} images in {MIXED_DIR}/)")
    return result


if __name__ == "__main__":
    run_cli(main)
