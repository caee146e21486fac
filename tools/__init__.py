"""Command-line tools, each run as ``python tools/NAME.py`` from the repository root; the library code they use lives
in packages (``analysis``, ``data``, ``predictor``). Only flags shared by several tools are defined here."""

import argparse

__all__ = ["add_labeled_images_args"]


def add_labeled_images_args(parser: argparse.ArgumentParser, replace: str) -> None:
    """The flags of the tools that read images with same-named ``.txt`` label files (``a.jpg`` + ``a.txt``):
    ``--input-dir``, ``--recursive``, ``--relative-paths`` and ``--yes`` (to replace ``replace`` without asking)."""
    parser.add_argument("--input-dir", required=True, help="folder of images, each with a same-named .txt of labels")
    parser.add_argument("--recursive", action="store_true", help="include images in sub-folders")
    parser.add_argument("--relative-paths", action="store_true",
                        help="write paths relative to --input-dir (then train with --data-path <input-dir>)")
    parser.add_argument("--yes", action="store_true", help=f"replace {replace} without asking")
