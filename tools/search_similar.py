#!/usr/bin/env python3
"""Find the works closest in style to a query: nearest reference images of a gallery, with scores and paths.

    python tools/search_similar.py --gallery gallery --checkpoint runs/t --query image.jpg --top-k 10
    python tools/search_similar.py --gallery gallery --query out/features.npy --names out/image_names.txt \
        --output similar.csv

The query is an image, a folder of images (with ``--checkpoint``: the gallery's model), or a ``.npy`` of style
vectors from that model. Scores are cosine similarities of L2-normalised vectors, from the gallery's Faiss index
(exact for small galleries, IVF above its size limit, IVF-PQ re-ranked exactly above its memory budget).
``--output`` ends in ``.json`` or ``.csv``.
"""

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from predictor import add_runtime_args, engine_options, load_model_bundle
from retrieval.gallery import BaseGallery
from retrieval.references import load_queries
from retrieval.store import open_gallery
from utils import UserError, run_cli

FIELDS = ("query", "rank", "score", "artist", "path")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", required=True,
                        help="a gallery from tools/build_gallery.py: a folder or a Milvus location (FILE.db or "
                             "http://host:19530, optionally #COLLECTION)")
    parser.add_argument("--query", required=True, help="an image, a folder of images, or a .npy of style vectors")
    parser.add_argument("--names", help="names of the rows of a .npy query, one per line (image_names.txt)")
    parser.add_argument("--checkpoint", help="the gallery's model (needed for image queries)")
    parser.add_argument("--top-k", type=int, default=10, help="works per query (default 10)")
    parser.add_argument("--output", help="write the results to a .json or .csv file")
    parser.add_argument("--batch-size", type=int, default=32)
    return add_runtime_args(parser, precision=False)


def nearest_works(gallery: BaseGallery, names: list[str], queries: Any, top_k: int) -> list[dict[str, Any]]:
    """Records ``{"query", "rank", "score", "artist", "path"}``, ``top_k`` per query, most similar first."""
    return [{"query": name, "rank": rank, "score": work["score"], "artist": work["artist"], "path": work["path"]}
            for name, works in zip(names, gallery.nearest(queries, top_k), strict=True)
            for rank, work in enumerate(works, 1)]


def write_results(path: Path, records: list[dict[str, Any]], gallery: BaseGallery) -> None:
    """JSON (with the index parameters and the note that scores are cosines of unit vectors) or CSV."""
    if path.suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--output {path} must end in .json or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(records)
        return
    report = {"metric": "cosine", "normalized": True, "index": gallery.index_parameters(), "results": records}
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main(args: argparse.Namespace | None = None) -> list[dict[str, Any]]:
    args = args if args is not None else get_args_parser().parse_args()
    if args.output and Path(args.output).suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--output {args.output} must end in .json or .csv")
    gallery = open_gallery(args.gallery)
    artist_model = None
    if args.checkpoint:
        artist_model = load_model_bundle(args.checkpoint, device=args.device, **engine_options(args))
        gallery.check_model(artist_model, args.gallery)
    names, queries = load_queries(args.query, artist_model, args.names, batch_size=args.batch_size,
                                  num_workers=args.num_workers)
    if queries.shape[1] != gallery.dim:
        raise UserError(f"query vectors have {queries.shape[1]} values but gallery {args.gallery} holds "
                        f"{gallery.dim}; use vectors from the gallery's model")
    records = nearest_works(gallery, names, queries, args.top_k)
    for record in records:
        if record["rank"] == 1:
            print(f"query: {record['query']}")
        print(f"{record['rank']:>5}  {record['score']:.4f}  {record['artist']}  {record['path']}")
    if args.output:
        write_results(Path(args.output), records, gallery)
        print(f"wrote {args.output}")
    return records


if __name__ == "__main__":
    run_cli(main)
