#!/usr/bin/env python3
"""Copy a gallery between a folder and Milvus, either way: references (in their order), model identity, thresholds
and calibration travel with it.

    python tools/gallery_copy.py gallery galleries.db                      # folder -> Milvus Lite
    python tools/gallery_copy.py gallery http://milvus:19530#artists       # folder -> a Milvus server
    python tools/gallery_copy.py http://milvus:19530#artists gallery_back  # Milvus -> folder

The vectors are streamed block by block. A target folder is written atomically (an existing gallery folder is
replaced); an existing Milvus collection is replaced only with ``--replace``.
"""

import argparse

from retrieval.gallery import BaseGallery
from retrieval.store import copy_gallery
from utils import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a gallery folder, or a Milvus location: FILE.db or http://host:19530, "
                                       "optionally #COLLECTION (default: gallery)")
    parser.add_argument("target", help="where the copy goes (a folder or a Milvus location)")
    parser.add_argument("--replace", action="store_true", help="drop an existing Milvus collection at the target")
    return parser


def main(args: argparse.Namespace | None = None) -> BaseGallery:
    args = args if args is not None else get_args_parser().parse_args()
    gallery = copy_gallery(args.source, args.target, args.replace)
    print(f"copied {gallery.size} vectors of {len(gallery.artist_names)} artists: {args.source} -> {args.target}")
    return gallery


if __name__ == "__main__":
    run_cli(main)
