#!/usr/bin/env python3
"""Group images by style: extract artist-model features for a folder (or read saved ones) and cluster them with KMeans.

Writes ``features.npy`` (float32, N x D), ``image_names.txt`` (line i names row i) and ``cluster_assignments.json``
(per cluster: id, size, files, centroid; per image: cluster and distance to its centroid; the silhouette score).
``--num-clusters auto`` picks k by silhouette score among candidates spaced log-uniformly up to one cluster per 20
vectors (or ``--max-clusters``) and reports the scores and why it chose its k. ``--features``/``--names`` cluster
vectors saved earlier (e.g. by ``inference_artist.py --mode cluster``) without running the model.
To extract on several GPUs or machines, run ``inference_artist.py --mode cluster`` under ``torchrun`` and cluster its
``features.npy`` here (docs/scale-out.md).
"""

import argparse
import os
from pathlib import Path

from analysis.clustering import ClusterResult, auto_reason, cluster_features, write_cluster_outputs
from artifacts.outputs import load_features
from predictor import DESCRIPTORS, add_runtime_args, engine_options, load_model_bundle
from utils import NumberRange, UserError, run_cli


def num_clusters_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1 cluster, got {k}")
    return k


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("input: a folder of images with a model, or saved features")
    source.add_argument("--images-dir", default=None, help="folder of images to extract features from")
    source.add_argument("--checkpoint", default=None, help="checkpoint file or model folder (with --images-dir)")
    source.add_argument("--model", default=None,
                        help="architecture, e.g. lsnet_t_artist (default: recorded in config.json or the checkpoint)")
    source.add_argument("--descriptor", choices=DESCRIPTORS, default="pooled",
                        help="style vector extracted from the images: pooled (default; the classifier head's input) "
                             "or texture (channel spreads of the first three stages)")
    source.add_argument("--features", default=None, help="a saved features.npy to cluster instead of images")
    source.add_argument("--names", default=None,
                        help="the image_names.txt of --features (default: image_names.txt next to it)")
    parser.add_argument("--num-clusters", type=num_clusters_arg, default="auto",
                        help="number of clusters, or 'auto' to pick it by silhouette score (default: auto)")
    parser.add_argument("--max-clusters", type=NumberRange(int, 2), default=None,
                        help="largest k 'auto' tries, e.g. about the number of artists times 2 (default: one "
                             "cluster per 20 vectors, at least 10)")
    parser.add_argument("--output-dir", required=True, help="where to write the result files")
    parser.add_argument("--l2-normalize", action=argparse.BooleanOptionalAction, default=True,
                        help="cluster unit-length vectors, i.e. by cosine similarity (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="KMeans seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                        help="include sub-folders of --images-dir (default: on)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size fed to the model (default: the checkpoint's training size, else the model's)")
    return add_runtime_args(parser, precision=False)


def main(args: argparse.Namespace | None = None) -> ClusterResult:
    args = args if args is not None else get_args_parser().parse_args()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("extract_cluster_features.py runs in one process; under torchrun, extract with "
                        "inference_artist.py --mode cluster, then cluster its features.npy here with --features")
    if (args.images_dir is None) == (args.features is None):
        raise UserError("pass either --images-dir (with --checkpoint) or --features (with --names)")
    if args.features is not None:
        names_path = args.names or Path(args.features).with_name("image_names.txt")
        features, names = load_features(args.features, names_path)
    else:
        if args.checkpoint is None:
            raise UserError("--images-dir needs --checkpoint (a checkpoint file or model folder) to extract features")
        if not Path(args.images_dir).is_dir():
            raise UserError(f"--images-dir {args.images_dir} is not a directory; pass the folder of images")
        artist_model = load_model_bundle(args.checkpoint, args.model, device=args.device, input_size=args.input_size,
                                         **engine_options(args))
        artist_model.use_descriptor(args.descriptor)
        batch = artist_model.run_directory(args.images_dir, "cluster", recursive=args.recursive,
                                           batch_size=args.batch_size, num_workers=args.num_workers, progress=True)
        features, names = batch.features, batch.names
        if batch.skipped:
            print(f"{len(batch.skipped)} unreadable images skipped (warned above)")
    result = cluster_features(features, args.num_clusters, seed=args.seed, l2_normalize=args.l2_normalize,
                              max_clusters=args.max_clusters)
    if result.auto_scores is not None:
        scores = ", ".join(f"k={k}: {'undefined' if s is None else f'{s:.4f}'}" for k, s in result.auto_scores.items())
        print(f"silhouette score by number of clusters: {scores}; chose {auto_reason(result)}")
    if result.reseeded:
        print(f"MiniBatchKMeans left {result.reseeded} of {result.num_clusters} clusters empty; k-means refinement "
              "re-seeded them with the vectors farthest from their centroids")
    paths = write_cluster_outputs(args.output_dir, features, names, result)
    silhouette = "undefined" if result.silhouette is None else f"{result.silhouette:.4f}"
    print(f"{len(names)} images in {result.num_clusters} clusters (silhouette score {silhouette}); "
          f"wrote {', '.join(p.name for p in paths.values())} to {args.output_dir}")
    return result


if __name__ == "__main__":
    run_cli(main)
