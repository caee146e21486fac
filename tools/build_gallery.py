#!/usr/bin/env python3
"""Build, extend or shrink an artist gallery, and calibrate its unknown-artist threshold.

    python tools/build_gallery.py --checkpoint runs/t --images refs --output-dir gallery
    python tools/build_gallery.py --checkpoint runs/t --images more_refs --output-dir gallery --add
    python tools/build_gallery.py --output-dir gallery --remove "Some Artist"
    python tools/build_gallery.py --checkpoint runs/t --output-dir gallery --calibrate val --target-false-unknown 0.05
    python tools/build_gallery.py --checkpoint runs/t --features out/features.npy --names out/image_names.txt \
        --output-dir gallery
    python tools/build_gallery.py --checkpoint runs/t --images refs --output-dir galleries.db        # Milvus Lite
    python tools/build_gallery.py --checkpoint runs/t --images refs --output-dir http://milvus:19530#artists

``--images`` holds one folder per artist (any number of images, nested folders allowed). ``--calibrate`` takes
held-out images of enrolled artists in the same layout and stores the threshold below which a best score means
"unknown artist", chosen so that ``--target-false-unknown`` of those images would be marked unknown. ``--features``
builds a new gallery from saved style vectors (``features.npy`` + ``image_names.txt`` of ``inference_artist.py``,
names ``artist/...``), read block by block, so millions of vectors need no more memory than their index.

Under ``torchrun`` the embedding is sharded: each process embeds its part of the images on its own device and the
main process builds and writes the gallery (:mod:`inference.sharding`, docs/scale-out.md).
"""

import argparse
import os
import shutil

from artifacts.outputs import read_names
from inference.sharding import Shards
from predictor import DESCRIPTORS, ArtistModel, add_runtime_args, engine_options, load_model_bundle
from retrieval.gallery import BaseGallery, Gallery, model_identity
from retrieval.index import EXACT_LIMIT, INDEX_MEMORY_GIB
from retrieval.references import artist_images, artist_of, embed_images
from retrieval.store import build_from_features, gallery_exists, open_gallery, save_gallery, work_folder
from utils import UserError, all_gather_objects, print_main, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model folder or checkpoint file (needed except for --remove)")
    parser.add_argument("--model", default=None, help="architecture (default: recorded with the checkpoint)")
    parser.add_argument("--images", help="reference images: one sub-folder per artist")
    parser.add_argument("--output-dir", required=True,
                        help="the gallery: a folder (written atomically), or a Milvus collection: a Milvus Lite file "
                             "(a path ending in .db) or a server (http://host:19530), each optionally #COLLECTION "
                             "(default: gallery)")
    parser.add_argument("--features", metavar="NPY",
                        help="build a new gallery from these style vectors (features.npy) instead of --images")
    parser.add_argument("--names", help="with --features: the name of each row, 'artist/...' (image_names.txt)")
    parser.add_argument("--add", action="store_true",
                        help="append the artists/images of --images to the existing gallery (old vectors are kept)")
    parser.add_argument("--remove", action="append", default=[], metavar="ARTIST",
                        help="remove an artist from the gallery (repeatable)")
    parser.add_argument("--calibrate", metavar="VAL_DIR",
                        help="held-out images of enrolled artists (one sub-folder per artist) to pick the threshold")
    parser.add_argument("--descriptor", choices=DESCRIPTORS, default=None,
                        help="style vector of a new gallery: texture (default for LSNet and ONNX models: the channel "
                             "spreads of the first three stages, best on artists the model never saw) or pooled "
                             "(the classifier head's input; the only one of glance-and-focus folders); an "
                             "existing gallery keeps its own")
    parser.add_argument("--target-false-unknown", type=float, default=0.05,
                        help="share of enrolled artists' images allowed to fall below the threshold (default 0.05)")
    parser.add_argument("--exact-limit", type=int, default=EXACT_LIMIT,
                        help=f"exact search up to this many vectors, IVF above (default {EXACT_LIMIT})")
    parser.add_argument("--index-memory-gib", type=float, default=INDEX_MEMORY_GIB,
                        help="memory budget of the search index: above it the vectors are compressed (IVF-PQ, "
                             f"re-ranked exactly from the stored vectors) (default {INDEX_MEMORY_GIB:g})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run's embedding from its work folder <output-dir>.partial")
    return add_runtime_args(parser, precision=False)


def _model(args: argparse.Namespace, needed_for: str, shards: Shards) -> ArtistModel:
    if not args.checkpoint:
        raise UserError(f"{needed_for} needs the model: pass --checkpoint")
    return shards.main_first(lambda: load_model_bundle(args.checkpoint, args.model, device=shards.device,
                                                       **engine_options(args)))


def enroll(gallery: BaseGallery | None, artist_model: ArtistModel, args: argparse.Namespace,
           shards: Shards) -> BaseGallery | None:
    """``gallery`` (or a new one) plus the images of ``--images`` it does not hold yet (None on the processes of a
    sharded run but the main one)."""
    names = artist_images(args.images)
    paths = {name: os.path.abspath(os.path.join(args.images, name)) for name in names}
    known = gallery.known_paths(paths.values()) if gallery is not None else set()
    names = [name for name in names if paths[name] not in known]
    if gallery is not None and not names:
        print_main(f"all images of {args.images} are in the gallery already")
        return gallery
    embedded = embed_images(artist_model, args.images, names, args.batch_size, args.num_workers,
                            work_folder(args.output_dir) / "images", args.resume, shards)
    if embedded is None:
        return None
    kept, vectors = embedded
    artists = [artist_of(name, args.images) for name in kept]
    new_paths = [paths[name] for name in kept]
    print(f"enrolled {len(kept)} images of {len(set(artists))} artists")
    if gallery is None:
        return Gallery(vectors, artists, new_paths, model_identity(artist_model), exact_limit=args.exact_limit,
                       index_memory_gib=args.index_memory_gib)
    return gallery.extended(vectors, artists, new_paths)


def calibrate(gallery: BaseGallery | None, artist_model: ArtistModel, args: argparse.Namespace,
              shards: Shards) -> BaseGallery | None:
    """Store the per-artist thresholds that mark ``--target-false-unknown`` of the enrolled artists' held-out
    images unknown (:meth:`Gallery.calibrate`). None on the processes of a sharded run but the main one."""
    names = artist_images(args.calibrate)
    artists = set(all_gather_objects(gallery.artist_names if shards.is_main else None)[0])  # the main one's
    enrolled = [name for name in names if artist_of(name, args.calibrate) in artists]
    if len(enrolled) < len(names):
        print_main(f"calibration: ignoring {len(names) - len(enrolled)} images of artists not in the gallery")
    embedded = embed_images(artist_model, args.calibrate, enrolled, args.batch_size, args.num_workers,
                            work_folder(args.output_dir) / "calibrate", args.resume, shards)
    if embedded is None:
        return None
    kept, vectors = embedded
    rate = gallery.calibrate(vectors, [artist_of(name, args.calibrate) for name in kept], args.target_false_unknown)
    gallery.calibration = {"images": len(kept), "folder": os.path.abspath(args.calibrate),
                           "target_false_unknown": args.target_false_unknown, "false_unknown_rate": rate,
                           "per_artist": True}
    thresholds = sorted(gallery.artist_thresholds.values())
    print(f"unknown thresholds {thresholds[0]:.4f}-{thresholds[-1]:.4f} ({len(thresholds)} artists, "
          f"{gallery.unknown_threshold:.4f} for the others): {rate:.1%} of {len(kept)} held-out images of enrolled "
          "artists score below them")
    return gallery


def from_features(artist_model: ArtistModel | None, args: argparse.Namespace) -> BaseGallery:
    """A new gallery from ``--features`` / ``--names`` (streamed); the model identity is recorded when
    ``--checkpoint`` is given, else only the vectors' size and style vector."""
    if not args.names:
        raise UserError("--features needs --names (the image_names.txt written with it) for the artists")
    names = read_names(args.names)
    artists = [artist_of(name, args.names) for name in names]
    if artist_model is not None:
        model = model_identity(artist_model)
    else:
        model = {"descriptor": args.descriptor or "pooled"}
        print("note: no --checkpoint: the gallery records only the vectors' size and style vector, so a query "
              "from another model of that size is not refused")
    gallery = build_from_features(args.features, artists, names, model, args.output_dir, args.exact_limit,
                                  args.index_memory_gib)
    print(f"enrolled {len(names)} vectors of {len(gallery.artist_names)} artists from {args.features}")
    return gallery


def main(args: argparse.Namespace | None = None) -> BaseGallery | None:
    args = args if args is not None else get_args_parser().parse_args()
    shards = Shards.join(args.device)
    try:
        return _build(args, shards)
    finally:
        shards.close()


def _build(args: argparse.Namespace, shards: Shards) -> BaseGallery | None:
    """:func:`main` in this process: the gallery it wrote (None on the processes of a sharded run but the main
    one, which writes it)."""
    out = args.output_dir
    exists = gallery_exists(out)
    if not (args.images or args.features or args.remove or args.calibrate):
        raise UserError("nothing to do: pass --images, --features, --remove or --calibrate")
    if args.features and (args.images or args.add or args.remove or exists):
        raise UserError("--features builds a new gallery: pass a new --output-dir, without --images, --add or "
                        "--remove")
    if args.images and exists and not args.add:
        raise UserError(f"{out} already holds a gallery; pass --add to extend it or another --output-dir")
    if (args.add or args.remove or (args.calibrate and not (args.images or args.features))) and not exists:
        raise UserError(f"{out} holds no gallery to change; build one first with --images")
    gallery = open_gallery(out) if exists else None
    if gallery is not None and args.descriptor not in (None, gallery.descriptor):
        raise UserError(f"{out} holds {gallery.descriptor} style vectors; drop --descriptor {args.descriptor} or "
                        "build a new gallery with it")
    if shards.distributed and (args.features or not (args.images or args.calibrate)):
        raise UserError("torchrun shards the embedding of --images and --calibrate; run --features or --remove in "
                        "one process")
    needs_model = args.images or args.calibrate or (args.features and args.checkpoint)
    artist_model = _model(args, "--images/--calibrate", shards) if needs_model else None
    if gallery is not None and artist_model is not None:
        gallery.check_model(artist_model, out)
    elif artist_model is not None:
        default = "texture" if "texture" in artist_model.descriptors else "pooled"
        artist_model.use_descriptor(args.descriptor or default)
    for artist in args.remove:
        gallery = gallery.removed(artist)
        print_main(f"removed {artist}")
    if args.features:
        gallery = from_features(artist_model, args)
    if args.images:
        gallery = enroll(gallery, artist_model, args, shards)
    if args.calibrate:
        gallery = calibrate(gallery, artist_model, args, shards)
    if not shards.is_main:
        return None
    if not args.calibrate and gallery.unknown_threshold is not None and (args.images or args.remove):
        print("note: the gallery changed since --calibrate; run --calibrate again to refresh its threshold")
    save_gallery(gallery, out)
    shutil.rmtree(work_folder(out), ignore_errors=True)  # the embeddings kept for --resume
    print(f"gallery: {len(gallery.artist_names)} artists, {gallery.size} vectors -> {out}")
    return gallery


if __name__ == "__main__":
    run_cli(main)
