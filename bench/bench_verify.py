"""Measure the memory and time of verifying near-limit images (issue 14): the bounded ``verify_image`` against a
full ``load_image`` per file (how verification worked before).

Generates ``--count`` PNGs of ``--side`` x ``--side`` pixels (small on disk: a repeated pattern of a few colours;
``--mode`` P, P with a transparent colour, or RGB), verifies them in ``--workers`` forked processes (as
prepare_dataset.py and training do on Linux) with each way, and reports what verifying one image adds to a
process's peak resident memory, that times the processes, and the wall time.

    python bench/bench_verify.py --count 3 --side 9459 --workers 3 --mode P-transparent
"""

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.images import load_image, verify_image
from data.scan import WORKER_MEMORY, memory_workers


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_verify.py", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3, help="images to generate")
    parser.add_argument("--side", type=int, default=9459, help="side in pixels (9459: just under Pillow's limit)")
    parser.add_argument("--mode", default="P-transparent", choices=("P", "P-transparent", "RGB"),
                        help="stored mode of the PNGs")
    parser.add_argument("--workers", type=int, default=3, help="verifying processes")
    return parser


def make_png(path: Path, side: int, mode: str, seed: int) -> Path:
    """A ``side`` x ``side`` PNG of 8-pixel blocks in 4 colours (rows repeat, so the file stays small)."""
    rng = np.random.default_rng(seed)
    row = np.repeat(rng.integers(0, 4, (side + 7) // 8, dtype=np.uint8), 8)[:side]
    indices = np.broadcast_to(row, (side, side))
    image = Image.fromarray(np.ascontiguousarray(indices), "L").convert("P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255] + [0] * 756)
    extra = {"transparency": 3} if mode == "P-transparent" else {}
    (image.convert("RGB") if mode == "RGB" else image).save(path, optimize=False, **extra)
    return path


def _legacy_verify(path: str) -> str | None:
    """Verification before issue 14: a full load_image (decode, upright, RGB conversion) of every file."""
    try:
        load_image(path)
    except OSError as err:
        return str(err)
    return None


def _verify_measured(way: str, path: str) -> tuple[str | None, int]:
    """Verify one image in this (fresh) process; return the result and how much it raised the peak memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = verify_image(path) if way == "bounded" else _legacy_verify(path)
    return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _measure(way: str, paths: list[str], workers: int) -> tuple[float, int]:
    """Verify ``paths`` in ``workers`` forked processes, a fresh one per image; the wall time and the largest rise
    of one process's peak resident memory."""
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        measured = pool.starmap(_verify_measured, [(way, path) for path in paths], chunksize=1)
    elapsed = time.perf_counter() - start
    assert all(result is None for result, _ in measured), measured
    return elapsed, max(added for _, added in measured)


def main() -> None:
    args = get_args_parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(make_png(Path(tmp, f"big_{i}.png"), args.side, args.mode, i)) for i in range(args.count)]
        size_kb = Path(paths[0]).stat().st_size / 1024
        print(f"{args.count} {args.mode} PNGs of {args.side}x{args.side} ({args.side ** 2 / 1e6:.1f} MP, "
              f"{size_kb:.0f} KB each), {args.workers} processes; memory allows {memory_workers()} verifying "
              f"processes of {WORKER_MEMORY // 2**20} MB")
        for way in ("full load_image (before)", "bounded verify_image (after)"):
            elapsed, added = _measure(way.split()[0], paths, args.workers)
            print(f"{way}: {elapsed:.1f} s for the folder, +{added / 2**20:.0f} MiB peak per process, <= "
                  f"{args.workers * added / 2**20:.0f} MiB for {args.workers} processes")


if __name__ == "__main__":
    main()
