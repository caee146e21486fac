#!/usr/bin/env python3
"""Artist-style inference: classify images by artist and/or extract style feature vectors for clustering.

Modes: ``classify`` (top-k artists), ``cluster`` (style feature vectors only; cluster them with
``tools/extract_cluster_features.py --features ... --names ...``) and ``both``.

A single image writes ``<output>/<stem>_result.json`` and prints it. A directory writes ``batch_results.json``
(per image, keyed by its path relative to ``--input``, plus the ``skipped`` unreadable files) and, in cluster and
both modes, ``features.npy`` (float32, N x D) with ``image_names.txt`` (row i of features.npy is line i). A directory
run streams: each batch goes to the work folder ``<output>.partial`` as it is computed (memory does not grow with
the image count), the files are assembled from it at the end, and ``--resume`` continues an interrupted run there
to the outputs an uninterrupted run writes (:mod:`artifacts.work_folder`). Under ``torchrun`` (one process per
GPU, or several on CPUs) each process runs its shard of the sorted image list and the main process writes the same
outputs from all of them (:mod:`inference.sharding`, docs/scale-out.md).

The work is done by the model :func:`deploy.engine.load_model_bundle` returns (``predictor.load_model_bundle``, which
services import); the script imports torch-free modules only, so a run on a cached ONNX engine starts without PyTorch;
the files and their guarantees (written as a set, no bare NaN in JSON) are :mod:`artifacts.outputs`'s.

With ``--gallery`` (from ``tools/build_gallery.py``) images are also identified by cosine similarity of their
L2-normalised style vectors to the gallery's artist prototypes, so models whose head does not know those artists
work too: ``gallery`` entries (top-k artists with scores, and ``unknown`` when the best score is below that artist's
calibrated threshold or ``--unknown-threshold``) go into the single-image JSON or ``gallery_results.json``.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from artifacts.outputs import (
    BATCH_RESULTS_FILE,
    FEATURES_FILE,
    GALLERY_RESULTS_FILE,
    NAMES_FILE,
    PART_FEATURES,
    PART_GALLERY,
    PART_NAMES,
    PART_RESULTS,
    PART_SKIPPED,
    part_data,
    prepare_output_dir,
    result_file_name,
    write_json_file,
    write_parts,
)
from artifacts.work_folder import Part, WorkFolder, list_identity, work_folder_for
from data import ImageLoadError
from deploy.engine import load_model_bundle
from errors import NumberRange, UserError, import_optional, run_cli
from inference.flags import add_runtime_args, engine_options
from inference.glance_focus import FocusOptions
from inference.results import DESCRIPTORS, MODES, BatchedModel, JoinedPaths, directory_images
from inference.sharding import Shards

if TYPE_CHECKING:
    from retrieval.gallery import BaseGallery


@dataclass(frozen=True)
class GalleryMatcher:
    """``--gallery`` loaded and checked against the model, with ``--unknown-threshold`` (None: the gallery's
    calibrated per-artist thresholds)."""

    gallery: "BaseGallery"
    threshold: float | None
    path: str
    identity: dict[str, Any]  # what changes when the gallery changes (for --resume)

    def match(self, features: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        return self.gallery.match(features, top_k, self.threshold)

    def thresholds(self) -> dict[str, Any]:
        """The thresholds that applied, for the report."""
        return self.gallery.thresholds(self.threshold)

    def verdict(self, match: dict[str, Any]) -> str:
        """One line for an image's ``match``: its closest artist and cosine, and whether it was judged unknown."""
        best, applied = match["artists"][0], self.thresholds()
        limit = (applied["artist_thresholds"] or {}).get(best["artist"], applied["unknown_threshold"])
        closest = f"{best['artist']} (cosine {best['score']:.4f}"
        if limit is None:
            return (f"closest {closest}); not judged known or unknown: the gallery has no threshold (build it with "
                    "--calibrate, or pass --unknown-threshold)")
        if match["unknown"]:
            return f"unknown artist: closest {closest}, below its threshold {limit:.4f})"
        return f"{closest}, not below its threshold {limit:.4f}): known artist"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="classify",
                        help="classify: top-k artists; cluster: style features only; both (default: classify)")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, or a model folder (model_best.pth / best_checkpoint.pth / "
                             "checkpoint.pth + class_mapping.csv + optional config.json)")
    parser.add_argument("--model", default=None,
                        help="architecture, e.g. lsnet_t_artist (default: recorded in config.json or the checkpoint)")
    parser.add_argument("--class-csv", default=None,
                        help="class_mapping.csv from training; needed to classify (default: the model folder's)")
    parser.add_argument("--input", required=True, help="an image file or a directory of images")
    parser.add_argument("--output", default="output", help="directory for the result files (default: output)")
    parser.add_argument("--batch-size", type=NumberRange(int, 1), default=32)
    parser.add_argument("--top-k", type=NumberRange(int, 1), default=5, help="classes kept per image (default: 5)")
    parser.add_argument("--threshold", type=NumberRange(float, 0, 1), default=0.0,
                        help="minimum probability of a kept class, applied after top-k (default: 0.0)")
    parser.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                        help="include sub-folders of a directory (default: on)")
    parser.add_argument("--input-size", type=NumberRange(int, 16), default=None,
                        help="image size fed to the model (default: the checkpoint's training size, else the model's)")
    parser.add_argument("--num-classes", type=NumberRange(int, 1), default=None,
                        help="optional check: classes of the head (default: detected from the CSV and checkpoint)")
    parser.add_argument("--feature-dim", type=NumberRange(int, 1), default=None,
                        help="optional check: feature vector size (default: detected from the checkpoint)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted directory run from its work folder <output>.partial (the same "
                             "command plus --resume; the outputs equal those of an uninterrupted run)")
    parser.add_argument("--no-json-features", dest="json_features", action="store_false",
                        help="leave feature vectors out of batch_results.json (features.npy keeps them)")
    parser.add_argument("--gallery", default=None,
                        help="identify artists by similarity to this gallery (tools/build_gallery.py: a folder or "
                             "a Milvus location, FILE.db or http://host:19530, optionally #COLLECTION); works "
                             "without --class-csv")
    parser.add_argument("--descriptor", choices=DESCRIPTORS, default=None,
                        help="style vector of the features: pooled (default; the classifier head's input) or texture "
                             "(channel spreads of the first three stages); with --gallery, the gallery's")
    parser.add_argument("--unknown-threshold", type=NumberRange(float, -1, 1), default=None,
                        help="with --gallery: best cosine below which an image is 'unknown' (default: the gallery's "
                             "calibrated threshold, none if it has none)")
    group = parser.add_argument_group("glance-and-focus models (train_glance_focus.py)")
    group.add_argument("--exit-threshold", type=NumberRange(float, 0, 1, low_open=True), default=None,
                       help="stop reading crops of an image once its top probability reaches this")
    group.add_argument("--budget", type=NumberRange(float, 0, low_open=True), default=None, metavar="GFLOPS",
                       help="average GFLOPs per image, met by the thresholds of train_glance_focus.py "
                            "--calibrate-budget")
    group.add_argument("--save-crops", default=None, metavar="DIR",
                       help="write each image with its glance and focus boxes drawn (PNG) under DIR")
    return add_runtime_args(parser)


def load_matcher(args: argparse.Namespace, artist_model: BatchedModel) -> GalleryMatcher | None:
    """``--gallery`` checked against the model (a gallery built with another model is refused), or None."""
    if not args.gallery:
        return None
    galleries = import_optional("retrieval.store", "requirements-retrieval.txt", "--gallery")
    gallery = galleries.open_gallery(args.gallery)
    if args.descriptor not in (None, gallery.descriptor):
        raise UserError(f"gallery {args.gallery} holds {gallery.descriptor} style vectors; drop --descriptor "
                        f"{args.descriptor}")
    gallery.check_model(artist_model, args.gallery)
    return GalleryMatcher(gallery, args.unknown_threshold, args.gallery, galleries.gallery_identity(args.gallery))


def effective_mode(mode: str, matcher: GalleryMatcher | None, artist_model: BatchedModel) -> str:
    """A gallery needs the style vectors: classify becomes both (cluster for a model without class names)."""
    if matcher is None or mode != "classify":
        return mode
    return "both" if artist_model.class_names is not None else "cluster"


def _metadata(artist_model: BatchedModel, mode: str, input_path: Path) -> dict[str, Any]:
    metadata = {"model": artist_model.model_name, "checkpoint": str(artist_model.checkpoint), "mode": mode,
                "input": str(input_path), "input_size": artist_model.input_size}
    if mode != "classify":
        # Texture vectors are unit length; pooled ones are as the head sees them (compare them by cosine).
        metadata["style_vector"] = {"descriptor": artist_model.descriptor,
                                    "normalized": artist_model.descriptor == "texture"}
    return metadata


def run_single(artist_model: BatchedModel, args: argparse.Namespace, output_dir: Path,
               matcher: GalleryMatcher | None = None) -> dict[str, Any]:
    """Classify / extract one image; write ``<stem>_result.json`` and print the result."""
    image = Path(args.input)
    mode = effective_mode(args.mode, matcher, artist_model)
    try:
        prediction = artist_model.predict(image, mode, top_k=args.top_k, threshold=args.threshold)
    except ImageLoadError as err:
        raise UserError(f"cannot read {image} ({err.reason}); pass an image file") from None
    record = _metadata(artist_model, mode, image)
    for rank, entry in enumerate(prediction.get("classification", []), start=1):
        print(f"{rank}. {entry['class_name']} (class {entry['class_id']}): {entry['probability']:.4f}")
    if "classification" in prediction:
        record["classification"] = prediction["classification"]
        if not prediction["classification"]:
            print(f"no class reaches the threshold {args.threshold}")
    if "features" in prediction:
        features = prediction["features"]
        record["features"] = features.tolist()
        print(f"features: {artist_model.descriptor} style vector, {features.size} values, "
              f"L2 norm {np.linalg.norm(features):.4f}")
    if matcher is not None:
        record["gallery"] = matcher.match(prediction["features"][None], args.top_k)[0]
        print(f"gallery: {matcher.verdict(record['gallery'])}")
    out_path = output_dir / result_file_name(image)
    if write_json_file(out_path, record):
        print("warning: NaN or infinite outputs, written as null", file=sys.stderr)
    print(f"result written to {out_path}")
    return record


def run_identity(artist_model: BatchedModel, args: argparse.Namespace, mode: str, names: list[str],
                 matcher: GalleryMatcher | None) -> dict[str, Any]:
    """What a directory run's outputs depend on: a ``--resume`` must find the same (model, images, flags)."""
    gallery = None
    if matcher is not None:
        gallery = {**matcher.identity, "--unknown-threshold": matcher.threshold}
    return {**artist_model.fingerprint(), "input folder": os.path.abspath(args.input),
            "image list": list_identity(names), "--mode": mode,
            "--top-k": args.top_k, "--threshold": args.threshold, "--no-json-features": not args.json_features,
            "--batch-size": args.batch_size, "--gallery": gallery, "--exit-threshold": args.exit_threshold,
            "--budget": args.budget}


def stream_part(artist_model: BatchedModel, args: argparse.Namespace, mode: str, names: list[str], part: Part,
                matcher: GalleryMatcher | None, shown_as: dict[str, Path]) -> None:
    """Run the images of ``part`` not done yet, appending each batch's results to it."""
    files = (PART_NAMES, PART_SKIPPED, PART_RESULTS) + ((PART_FEATURES,) if mode != "classify" else ()) + (
        (PART_GALLERY,) if matcher is not None else ())
    todo = names[part.start + part.progress.done:part.stop]
    with part.writer(files, shown_as) as writer:
        # The run's batch size, not the rest's: a continued run cuts and pads its batches as an uninterrupted one.
        for batch in artist_model.stream_paths(
            JoinedPaths(args.input, todo), mode, names=todo, top_k=args.top_k, threshold=args.threshold,
            batch_size=min(args.batch_size, len(names)), num_workers=args.num_workers, progress=True,
        ):
            gallery = None
            if matcher is not None:
                gallery = matcher.match(batch.features, args.top_k) if batch.names else []
            data, counters = part_data(batch.names, batch.features, [asdict(s) for s in batch.skipped],
                                       (entry for _, entry in batch.entries(args.json_features)), gallery)
            writer.append(len(batch.names) + len(batch.skipped), len(batch.names), data, counters)


def run_batch(artist_model: BatchedModel, args: argparse.Namespace, output_dir: Path,
              matcher: GalleryMatcher | None, shards: Shards) -> dict[str, Any] | None:
    """Run a directory, streaming the results into the work folder ``<output>.partial`` (``--resume`` continues
    an interrupted run there), then write ``batch_results.json`` and, with features, ``features.npy`` +
    ``image_names.txt`` (and ``gallery_results.json``) from it as one set. Returns the counts and files (None on
    the processes of a sharded run other than the main one, which writes the outputs)."""
    start = time.perf_counter()
    mode = effective_mode(args.mode, matcher, artist_model)
    names, bad_names = directory_images(args.input, args.recursive)
    identity = run_identity(artist_model, args, mode, names + [s.path for s in bad_names], matcher)
    work = shards.start(work_folder_for(output_dir), identity, len(names), args.batch_size, args.resume,
                        {"skipped": [asdict(s) for s in bad_names]})
    done_before = work.done
    if done_before and shards.is_main:
        print(f"resuming: {done_before} of {len(names)} images done in {work.path}")
    shown_as = {PART_FEATURES: output_dir / FEATURES_FILE, PART_NAMES: output_dir / NAMES_FILE,
                PART_GALLERY: output_dir / GALLERY_RESULTS_FILE, PART_RESULTS: output_dir / BATCH_RESULTS_FILE,
                PART_SKIPPED: output_dir / BATCH_RESULTS_FILE}
    with shards.running(work):
        for part in shards.mine(work):
            stream_part(artist_model, args, mode, names, part, matcher, shown_as)
    if not shards.gather(work):
        return None
    ran = work.done - done_before  # by every process
    elapsed = time.perf_counter() - start
    gallery_head = None
    if matcher is not None:
        unknown = sum(part.progress.counters.get("unknown", 0) for part in work.parts)
        print(f"gallery: {unknown} of {sum(part.progress.rows for part in work.parts)} images unknown")
        gallery_head = {"gallery": matcher.path, "metric": "cosine", "normalized": True, **matcher.thresholds()}
    written, nonfinite = write_parts(output_dir, work.parts, _metadata(artist_model, mode, Path(args.input)),
                                     work.notes["skipped"], None if mode == "classify" else artist_model.feature_dim,
                                     gallery_head)
    work.remove()
    if nonfinite:
        print(f"warning: {nonfinite} images have NaN or infinite outputs, written as null (num_nonfinite in "
              f"{BATCH_RESULTS_FILE})", file=sys.stderr)
    rows = sum(part.progress.rows for part in work.parts)
    skipped = len(names) + len(bad_names) - rows
    print(f"{rows} images, {skipped} skipped ({ran} run now in {elapsed:.1f}s, {ran / max(elapsed, 1e-9):.1f} "
          f"img/s); wrote {', '.join(written)} to {output_dir}")
    if mode != "classify":
        print(f"{FEATURES_FILE}: {artist_model.descriptor} style vectors, {artist_model.feature_dim} values per image")
    if mode == "cluster":
        print(f"cluster them: python tools/extract_cluster_features.py --features {output_dir / FEATURES_FILE} "
              f"--names {output_dir / NAMES_FILE} --num-clusters auto --output-dir {output_dir / 'clusters'}")
    return {"images": rows, "skipped": skipped, "files": written}


def main(args: argparse.Namespace | None = None) -> dict[str, Any] | None:
    args = args if args is not None else get_args_parser().parse_args()
    input_path = Path(args.input)
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}; pass an image file or a directory of images")
    if args.resume and not input_path.is_dir():
        raise UserError("--resume continues an interrupted directory run; drop it for a single image")
    output_dir = prepare_output_dir(args.output)
    shards = Shards.join(args.device)
    try:
        return _run(args, input_path, output_dir, shards)
    finally:
        shards.close()


def _run(args: argparse.Namespace, input_path: Path, output_dir: Path, shards: Shards) -> dict[str, Any] | None:
    if shards.distributed and not input_path.is_dir():
        raise UserError("torchrun shards the images of a directory; run a single image in one process")
    if input_path.is_dir() and shards.is_main:
        WorkFolder.check(work_folder_for(output_dir), args.resume)  # before loading the model
    artist_model = shards.main_first(lambda: load_model_bundle(
        args.checkpoint, args.model, args.class_csv, device=shards.device, input_size=args.input_size,
        num_classes=args.num_classes, feature_dim=args.feature_dim, amp=args.amp,
        require_class_names=args.mode != "cluster" and not args.gallery, compile=args.compile,
        focus=FocusOptions(args.exit_threshold, args.budget, args.save_crops), **engine_options(args),
    ))
    if args.descriptor is not None:
        artist_model.use_descriptor(args.descriptor)
    matcher = load_matcher(args, artist_model)
    if input_path.is_dir():
        return run_batch(artist_model, args, output_dir, matcher, shards)
    return run_single(artist_model, args, output_dir, matcher)


if __name__ == "__main__":
    run_cli(main)
