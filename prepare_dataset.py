"""Prepare an artist dataset: ``source_dir/<artist>/<images...>`` -> ``output_dir/{train,val}/<artist>/`` + metadata.

Example:
    python prepare_dataset.py --source-dir artists/ --output-dir artist_dataset/ --val-ratio 0.2 --min-images 10
"""

import argparse

from data.prepare import prepare_dataset
from utils import NumberRange, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "prepare_dataset.py", description="Verify, filter and split an artist image collection into train/ and val/."
    )
    parser.add_argument("--source-dir", required=True, help="one folder per artist; images may be in sub-folders")
    parser.add_argument("--output-dir", required=True, help="where train/, val/ and the metadata files are written")
    parser.add_argument("--val-ratio", type=NumberRange(float, 0, 1, high_open=True), default=0.2,
                        help="share of each artist's images for val/")
    parser.add_argument("--min-images", type=NumberRange(int, 1), default=10,
                        help="skip artists with fewer valid images")
    parser.add_argument("--seed", type=NumberRange(int, 0), default=0, help="seed of the (deterministic) split")
    link = parser.add_mutually_exclusive_group()
    link.add_argument("--symlink", action="store_const", const="symlink", dest="link",
                      help="symlink the images instead of copying them")
    link.add_argument("--hardlink", action="store_const", const="hardlink", dest="link",
                      help="hard-link the images instead of copying them (same filesystem only)")
    parser.set_defaults(link="copy")
    parser.add_argument("--max-images-per-class", type=NumberRange(int, 1), default=None,
                        help="keep at most this many images per artist (a seeded random subset)")
    parser.add_argument("--workers", type=NumberRange(int, 0), default=None,
                        help="processes that decode images for verification (default: all usable cores)")
    parser.add_argument("--yes", action="store_true", help="replace an existing dataset in --output-dir without asking")
    return parser


def main(args: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(args)
    prepare_dataset(
        args.source_dir, args.output_dir, val_ratio=args.val_ratio, min_images=args.min_images, seed=args.seed,
        link=args.link, max_images_per_class=args.max_images_per_class, workers=args.workers, assume_yes=args.yes,
    )


if __name__ == "__main__":
    run_cli(main)
