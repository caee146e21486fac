#!/usr/bin/env python3
"""Generate a fine-grained, long-tailed artist world: artists share a medium and differ in its parameters.

    python tools/make_medium_world.py --output-dir medium_world --families ink dots --artists 12 --seed 0

Real community collections are mostly one medium (digital illustration) used differently, with a long tail of
artists. Here every artist of a family (medium) paints with that family's palette, paper and fill; artists differ
only in the medium's parameters (hatching direction and spacing, line weight, dot size, blur, grain, colour
quantisation, outline weight). Any two artists of a family differ in at least two parameters, so each artist is
recognisable, but never by colour or kind of mark alone. Image counts fall geometrically from ``--most`` to
``--fewest`` per artist, spread over the families. The content is the random compositions of
tools/make_synthetic_artists.py. Writes the raw ``output_dir/<artist>/`` layout for ``prepare_dataset.py``.
"""

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from tools.make_synthetic_artists import Style, make_content, render
from utils import UserError, run_cli

__all__ = ["FAMILIES", "long_tail_counts", "medium_styles", "make_medium_world", "main"]

_PAPER = (0.96, 0.94, 0.90)
# family: (the medium shared by its artists, {parameter: values an artist picks from}); lengths at 256 px.
FAMILIES: dict[str, tuple[Style, dict[str, tuple]]] = {
    "ink": (Style("ink", (0.08,), 0.03, (0.15, 0.4), (0.55, 0.95), _PAPER, (0.12, 0.10, 0.10), "hatch"),
            {"angle": (0.0, 22.5, 45.0, 67.5, 90.0), "spacing": (12.0, 18.0, 26.0), "stroke": (3.0, 6.0),
             "outline": (0, 6)}),
    "dots": (Style("dots", (0.0, 0.6), 0.04, (0.5, 0.9), (0.7, 1.0), _PAPER, (0.2, 0.1, 0.1), "stipple"),
             {"spacing": (12.0, 18.0, 26.0), "stroke": (2.5, 4.5), "grain": (0.0, 0.06), "outline": (0, 6)}),
    "paint": (Style("paint", (0.55, 0.1), 0.05, (0.3, 0.7), (0.6, 0.95), _PAPER, (0.25, 0.2, 0.3), "flat"),
              {"blur": (0.0, 4.0, 8.0), "grain": (0.0, 0.07), "outline": (0, 4, 10), "texture": (0.0, 0.35)}),
    "pixel": (Style("pixel", (0.72, 0.3), 0.05, (0.5, 1.0), (0.5, 1.0), (0.12, 0.12, 0.2), (0.9, 0.9, 1.0),
                    "flat"),
              {"pixel": (1, 6, 12), "levels": (0, 3, 5), "grain": (0.0, 0.06), "outline": (0, 6)}),
}


def _distinct_combinations(grid: dict[str, tuple], count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` parameter combinations in random order, any two differing in at least two parameters."""
    combos = list(itertools.product(*grid.values()))
    chosen: list[tuple] = []
    for i in rng.permutation(len(combos)):
        if all(sum(a != b for a, b in zip(combos[i], c, strict=True)) >= 2 for c in chosen):
            chosen.append(combos[i])
        if len(chosen) == count:
            return [dict(zip(grid, c, strict=True)) for c in chosen]
    raise UserError(f"the medium offers only {len(chosen)} distinct artists; use fewer --artists or more --families")


def medium_styles(families: list[str], artists: int, seed: int) -> list[Style]:
    """The styles of ``artists`` artists dealt round-robin to ``families`` (the seed picks their parameters)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UserError(f"unknown --families {' '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, 0xFA111])
    per_family = {f: _distinct_combinations(FAMILIES[f][1], -(-artists // len(families)), rng) for f in families}
    styles = []
    for i in range(artists):
        family = families[i % len(families)]
        params = per_family[family][i // len(families)]
        styles.append(replace(FAMILIES[family][0], name=f"{family}_{i + 1:02d}", **params))
    return styles


def long_tail_counts(artists: int, most: int, fewest: int) -> list[int]:
    """Images per artist, falling geometrically from ``most`` to ``fewest``."""
    if artists < 2 or not 1 <= fewest <= most:
        raise UserError("use --artists 2 or more and 1 <= --fewest <= --most")
    return [round(most * (fewest / most) ** (i / (artists - 1))) for i in range(artists)]


def make_medium_world(output_dir: str | Path, families: list[str], artists: int = 12, most: int = 30,
                      fewest: int = 6, size: int = 96, seed: int = 0) -> dict[str, int]:
    """Write ``output_dir/<artist>/NNNN.png``; returns the images per artist (a long tail over the families)."""
    if size < 32:
        raise UserError(f"--size {size} is too small to show a medium's parameters; use at least 32")
    styles, counts = medium_styles(families, artists, seed), long_tail_counts(artists, most, fewest)
    written = {}
    for a, (style, count) in enumerate(zip(styles, counts, strict=True)):
        folder = Path(output_dir, style.name)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, a, i])
            image = render(make_content(rng, size), style, rng)
            Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
        written[style.name] = count
    return written


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_medium_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="where to write <artist>/ folders")
    parser.add_argument("--families", nargs="+", default=["ink", "dots"], help=f"media: {', '.join(FAMILIES)}")
    parser.add_argument("--artists", type=int, default=12)
    parser.add_argument("--most", type=int, default=30, help="images of the largest artist")
    parser.add_argument("--fewest", type=int, default=6, help="images of the smallest artist")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="picks the artists' parameters and the content")
    return parser


def main(args: argparse.Namespace | None = None) -> dict[str, int]:
    args = args if args is not None else get_args_parser().parse_args()
    counts = make_medium_world(args.output_dir, args.families, args.artists, args.most, args.fewest, args.size,
                               args.seed)
    print(f"wrote {sum(counts.values())} images of {len(counts)} artists ({max(counts.values())}.."
          f"{min(counts.values())} each) to {args.output_dir}")
    return counts


if __name__ == "__main__":
    run_cli(main)
