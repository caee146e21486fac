"""Benchmark image verification (the costly part of prepare_dataset.py) on generated JPEGs.

Reports verified images per second with 1 process and with ``--workers`` processes, a full prepare_dataset run,
and the time to write and read a scan cache of ``--cache-entries`` entries (what a 1M-image dataset needs).

    python bench/bench_prepare.py --num-images 2000 --size 256 --workers 8 --cache-entries 1000000
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.prepare import prepare_dataset
from data.scan import CACHE_FILE, ScanCache, default_workers, verify_images
from utils import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_prepare.py", description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000, help="images to generate")
    parser.add_argument("--classes", type=int, default=20, help="artist folders to spread them over")
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs in pixels")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes for the parallel run")
    parser.add_argument("--cache-entries", type=int, default=100_000, help="entries of the cache timing (0: skip)")
    return parser


def generate(root: Path, num_images: int, classes: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    # smooth random images compress like photos/paintings; pure noise would make decoding unrealistically slow
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    paths = []
    for i in range(num_images):
        tile = np.roll(base, i, axis=(0, 1))
        image = Image.fromarray(tile).resize((size, size), Image.BICUBIC)
        path = root / f"artist_{i % classes:04d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        paths.append(path)
    return paths


def timed(label: str, count: int, fn) -> None:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{label:<42} {count / seconds:10.0f} images/s  ({seconds:.2f} s)")


def main(args: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = generate(root / "src", args.num_images, args.classes, args.size)
        print(f"{args.num_images} JPEGs of {args.size}x{args.size} in {args.classes} folders, {os.cpu_count()} CPUs")
        timed("verify, 1 process", len(paths), lambda: verify_images(paths, workers=1, verbose=False))
        timed(f"verify, {args.workers} processes", len(paths),
              lambda: verify_images(paths, workers=args.workers, verbose=False))
        timed(f"prepare_dataset (copy), {args.workers} processes", len(paths),
              lambda: prepare_dataset(root / "src", root / "out", min_images=1, workers=args.workers,
                                      verbose=False))
        if args.cache_entries:
            cache = ScanCache(root / CACHE_FILE, root)
            entries = {f"train/artist_{i % 1000:04d}/{i:07d}.jpg": (123456, 1700000000000000000 + i, None)
                       for i in range(args.cache_entries)}
            timed("scan cache: write", args.cache_entries, lambda: cache.save(entries))
            timed("scan cache: read", args.cache_entries, cache.load)


if __name__ == "__main__":
    run_cli(main)
