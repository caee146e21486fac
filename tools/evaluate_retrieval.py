#!/usr/bin/env python3
"""Evaluate style vectors as people in artist retrieval do: Recall@k, mAP@R, MRR, identification and open set.

    python tools/evaluate_retrieval.py --features out/features.npy --names out/image_names.txt
    python tools/evaluate_retrieval.py --gallery gallery --queries test_images --checkpoint runs/t

Retrieval: every image of ``--features`` queries all the others (its own image excluded); labels are the top
folder of each line of ``--names`` (``artist/file.jpg``). Each query's nearest images come from a k-NN search as
deep as its artist's other images (at least 100): exact up to ``--exact-limit`` vectors, through inverted lists
above (the report gives the search used and its agreement with exact search on a sample of queries).

Identification: the images of ``--queries`` (one sub-folder per artist) are matched to the gallery's artist
prototypes; top-1/top-5 over artists in the gallery, and with the gallery's calibrated per-artist thresholds (or
one ``--unknown-threshold``) the share of enrolled artists' images marked unknown (false unknown) and of other
artists' images marked unknown (unknown detection).
"""

import argparse
import json
from pathlib import Path
from typing import Any

from artifacts.outputs import load_features
from predictor import add_runtime_args, engine_options, load_model_bundle
from retrieval.metrics import EXACT_LIMIT, QUERY_CHUNK, identification_metrics, retrieval_metrics
from retrieval.references import artist_images, artist_of, embed_images
from retrieval.store import open_gallery
from utils import NumberRange, UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", help="features.npy (N x D) written by inference_artist.py --mode cluster")
    parser.add_argument("--names", help="image_names.txt of the features; the top folder of a name is its artist")
    parser.add_argument("--exact-limit", type=NumberRange(int, 1), default=EXACT_LIMIT,
                        help="search exactly up to this many vectors, through inverted lists above (default: "
                             "%(default)s; exact time grows with the square of the count)")
    parser.add_argument("--query-chunk", type=NumberRange(int, 1), default=QUERY_CHUNK,
                        help="queries searched at once; their results are held in memory (default: %(default)s)")
    parser.add_argument("--max-depth", type=NumberRange(int, 1), default=None,
                        help="search at most this many results per query (default: as many as the query's artist "
                             "has other images, so mAP@R is exact; a cap makes it a lower bound)")
    parser.add_argument("--gallery", help="a gallery from tools/build_gallery.py (a folder or a Milvus location)")
    parser.add_argument("--queries", help="query images, one sub-folder per artist (with --gallery)")
    parser.add_argument("--checkpoint", help="the gallery's model (with --queries)")
    parser.add_argument("--unknown-threshold", type=float, default=None,
                        help="cosine below which a query is unknown, for every artist (default: the gallery's "
                             "calibrated per-artist thresholds)")
    parser.add_argument("--output", default="retrieval_metrics.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    return add_runtime_args(parser, precision=False)


def evaluate_features(args: argparse.Namespace) -> dict[str, Any]:
    if not args.names:
        raise UserError("--features needs --names (the image_names.txt written with it) for the artist labels")
    features, names = load_features(args.features, args.names)
    labels = [artist_of(name, args.names) for name in names]
    del names
    return retrieval_metrics(features, labels, exact_limit=args.exact_limit, query_chunk=args.query_chunk,
                             max_depth=args.max_depth)


def evaluate_gallery(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.queries and args.checkpoint):
        raise UserError("--gallery needs --queries (images, one sub-folder per artist) and --checkpoint")
    gallery = open_gallery(args.gallery)
    artist_model = load_model_bundle(args.checkpoint, device=args.device, **engine_options(args))
    gallery.check_model(artist_model, args.gallery)
    kept, vectors = embed_images(artist_model, args.queries, artist_images(args.queries), args.batch_size,
                                 args.num_workers)
    scores, ids = gallery.identify(vectors, 5)
    predicted = [[gallery.artist_names[i] for i in row] for row in ids]
    truth = [artist_of(name, args.queries) for name in kept]
    result = identification_metrics(predicted, truth, set(gallery.artist_names),
                                    gallery.unknown(scores, ids, args.unknown_threshold))
    result.update(gallery.thresholds(args.unknown_threshold))
    result["per_artist_thresholds"] = bool(result["artist_thresholds"])
    return result


def format_table(report: dict[str, Any], indent: str = "") -> str:
    """Two columns, metric and value, one section per evaluation (nested sections indented)."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", format_table(value, indent + "  ")]
        else:
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{indent}{key:<{max(26 - len(indent), 1)}} {shown}")
    return "\n".join(lines)


def main(args: argparse.Namespace | None = None) -> dict[str, Any]:
    args = args if args is not None else get_args_parser().parse_args()
    if not (args.features or args.gallery):
        raise UserError("nothing to evaluate: pass --features/--names and/or --gallery/--queries/--checkpoint")
    report: dict[str, Any] = {}
    if args.features:
        report["retrieval"] = evaluate_features(args)
    if args.gallery:
        report["identification"] = evaluate_gallery(args)
    print(format_table(report))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    run_cli(main)
