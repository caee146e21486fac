#!/usr/bin/env python3
"""Artist-style inference: classify images by artist and/or extract style feature vectors for clustering.

Modes: ``classify`` (top-k artists), ``cluster`` (style feature vectors only; cluster them with
``tools/extract_cluster_features.py --features ... --names ...``) and ``both``.

A single image writes ``<output>/<stem>_result.json`` and prints it. A directory writes ``batch_results.json``
(per image, keyed by its path relative to ``--input``, plus the ``skipped`` unreadable files) and, in cluster and
both modes, ``features.npy`` (float32, N x D) with ``image_names.txt`` (row i of features.npy is line i).

With ``--gallery`` (from ``tools/build_gallery.py``) images are also identified by cosine similarity of their
L2-normalised style vectors to the gallery's artist prototypes, so models whose head does not know those artists
work too: ``gallery`` entries (top-k artists with scores, and ``unknown`` when the best score is below the gallery's
calibrated threshold or ``--unknown-threshold``) go into the single-image JSON or ``gallery_results.json``.

The work is done by :mod:`predictor` (``load_model_bundle`` and ``ArtistModel``), which services import directly.
"""

import argparse
import functools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data import ImageLoadError
from predictor import MODES, ArtistModel, BatchResult, add_runtime_args, load_model_bundle
from retrieval.gallery import Gallery, load_gallery, model_identity
from retrieval.index import l2_normalize
from utils import UserError, run_cli

BATCH_RESULTS_FILE = "batch_results.json"
GALLERY_RESULTS_FILE = "gallery_results.json"
FEATURES_FILE = "features.npy"
NAMES_FILE = "image_names.txt"


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
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=5, help="classes kept per image (default: 5)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="minimum probability of a kept class, applied after top-k (default: 0.0)")
    parser.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                        help="include sub-folders of a directory (default: on)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size fed to the model (default: the checkpoint's training size, else the model's)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="optional check: classes of the head (default: detected from the CSV and checkpoint)")
    parser.add_argument("--feature-dim", type=int, default=None,
                        help="optional check: feature vector size (default: detected from the checkpoint)")
    parser.add_argument("--no-json-features", dest="json_features", action="store_false",
                        help="leave feature vectors out of batch_results.json (features.npy keeps them)")
    parser.add_argument("--gallery", default=None,
                        help="identify artists by similarity to this gallery (tools/build_gallery.py); "
                             "works without --class-csv")
    parser.add_argument("--unknown-threshold", type=float, default=None,
                        help="with --gallery: best cosine below which an image is 'unknown' (default: the gallery's "
                             "calibrated threshold, none if it has none)")
    return add_runtime_args(parser)


def identify_with_gallery(gallery: Gallery, features: np.ndarray, top_k: int,
                          threshold: float | None) -> list[dict[str, Any]]:
    """Per image: ``{"artists": [{"artist", "score"}...], "unknown": bool}`` from cosine scores to the prototypes."""
    scores, ids = gallery.identify(l2_normalize(features, "style vector"), top_k)
    return [{"artists": [{"artist": gallery.artist_names[i], "score": float(s)} for s, i in zip(row_s, row_i,
                                                                                                strict=True)],
             "unknown": bool(threshold is not None and row_s[0] < threshold)}
            for row_s, row_i in zip(scores, ids, strict=True)]


def _with_gallery(args: argparse.Namespace, artist_model: ArtistModel) -> tuple[Gallery | None, float | None]:
    """Load ``--gallery`` (checked against the model); its features are needed, so classify becomes both."""
    if not args.gallery:
        return None, None
    gallery = load_gallery(args.gallery)
    gallery.check_model(model_identity(artist_model), args.gallery)
    if args.mode == "classify":
        args.mode = "both" if artist_model.class_names is not None else "cluster"
    threshold = args.unknown_threshold if args.unknown_threshold is not None else gallery.unknown_threshold
    return gallery, threshold


def _metadata(artist_model: ArtistModel, mode: str, input_path: Path) -> dict[str, Any]:
    return {"model": artist_model.model_name, "checkpoint": str(artist_model.checkpoint), "mode": mode,
            "input": str(input_path), "input_size": artist_model.input_size}


def write_batch_results(
    path: Path, result: BatchResult, metadata: dict[str, Any], include_features: bool = True
) -> None:
    """Write ``batch_results.json`` one image at a time, so a million images never build one huge string."""
    dump = functools.partial(json.dumps, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        for key, value in {**metadata, "num_images": len(result.names), "num_skipped": len(result.skipped)}.items():
            f.write(f"  {dump(key)}: {dump(value)},\n")
        f.write('  "results": {')
        for i, (name, entry) in enumerate(result.entries(include_features)):
            f.write(f"{',' if i else ''}\n    {dump(name)}: {dump(entry)}")
        f.write("\n  },\n")
        f.write(f'  "skipped": {json.dumps([asdict(s) for s in result.skipped], ensure_ascii=False, indent=4)}\n}}\n')


def write_features(output_dir: Path, names: list[str], features: np.ndarray) -> None:
    """``features.npy`` (float32, N x D) and ``image_names.txt`` (line i names row i)."""
    np.save(output_dir / FEATURES_FILE, features.astype(np.float32, copy=False))
    (output_dir / NAMES_FILE).write_text("".join(f"{name}\n" for name in names), encoding="utf-8")


def run_single(artist_model: ArtistModel, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Classify / extract one image; write ``<stem>_result.json`` and print the result."""
    image = Path(args.input)
    try:
        prediction = artist_model.predict(image, args.mode, top_k=args.top_k, threshold=args.threshold)
    except ImageLoadError as err:
        raise UserError(f"cannot read {image} ({err.reason}); pass an image file") from None
    record = _metadata(artist_model, args.mode, image)
    for rank, entry in enumerate(prediction.get("classification", []), start=1):
        print(f"{rank}. {entry['class_name']} (class {entry['class_id']}): {entry['probability']:.4f}")
    if "classification" in prediction:
        record["classification"] = prediction["classification"]
        if not prediction["classification"]:
            print(f"no class reaches the threshold {args.threshold}")
    if "features" in prediction:
        features = prediction["features"]
        record["features"] = features.tolist()
        print(f"features: {features.size} values, L2 norm {np.linalg.norm(features):.4f}")
    if getattr(args, "gallery_obj", None) is not None:
        record["gallery"] = identify_with_gallery(args.gallery_obj, features[None], args.top_k,
                                                  args.gallery_threshold)[0]
        best = record["gallery"]["artists"][0]
        print(f"gallery: {'unknown, ' if record['gallery']['unknown'] else ''}closest {best['artist']} "
              f"(cosine {best['score']:.4f})")
    out_path = output_dir / f"{image.stem}_result.json"
    out_path.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"result written to {out_path}")
    return record


def run_batch(artist_model: ArtistModel, args: argparse.Namespace, output_dir: Path) -> BatchResult:
    """Run a directory; write ``batch_results.json`` and, with features, ``features.npy`` + ``image_names.txt``."""
    start = time.perf_counter()
    result = artist_model.run_directory(
        args.input, args.mode, recursive=args.recursive, top_k=args.top_k, threshold=args.threshold,
        batch_size=args.batch_size, num_workers=args.num_workers, progress=True,
    )
    elapsed = time.perf_counter() - start
    write_batch_results(output_dir / BATCH_RESULTS_FILE, result, _metadata(artist_model, args.mode, Path(args.input)),
                        include_features=args.json_features)
    written = [BATCH_RESULTS_FILE]
    if result.features is not None:
        write_features(output_dir, result.names, result.features)
        written += [FEATURES_FILE, NAMES_FILE]
    print(f"{len(result.names)} images in {elapsed:.1f}s ({len(result.names) / max(elapsed, 1e-9):.1f} img/s), "
          f"{len(result.skipped)} skipped; wrote {', '.join(written)} to {output_dir}")
    if getattr(args, "gallery_obj", None) is not None:
        matches = identify_with_gallery(args.gallery_obj, result.features, args.top_k, args.gallery_threshold)
        report = {"gallery": args.gallery, "metric": "cosine", "normalized": True,
                  "unknown_threshold": args.gallery_threshold, "results": dict(zip(result.names, matches, strict=True))}
        (output_dir / GALLERY_RESULTS_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                                        encoding="utf-8")
        print(f"gallery: {sum(m['unknown'] for m in matches)} of {len(matches)} images unknown; wrote "
              f"{GALLERY_RESULTS_FILE}")
    if args.mode == "cluster":
        print(f"cluster them: python tools/extract_cluster_features.py --features {output_dir / FEATURES_FILE} "
              f"--names {output_dir / NAMES_FILE} --num-clusters auto --output-dir {output_dir / 'clusters'}")
    return result


def main(args: argparse.Namespace | None = None) -> dict[str, Any] | BatchResult:
    args = args if args is not None else get_args_parser().parse_args()
    input_path = Path(args.input)
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}; pass an image file or a directory of images")
    output_dir = Path(args.output)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {output_dir} ({err.strerror}); pass another --output") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"output directory {output_dir} is not writable; pass another --output")
    artist_model = load_model_bundle(
        args.checkpoint, args.model, args.class_csv, device=args.device, input_size=args.input_size,
        num_classes=args.num_classes, feature_dim=args.feature_dim, amp=args.amp,
        require_class_names=args.mode != "cluster" and not args.gallery, compile=args.compile,
    )
    args.gallery_obj, args.gallery_threshold = _with_gallery(args, artist_model)
    if input_path.is_dir():
        return run_batch(artist_model, args, output_dir)
    return run_single(artist_model, args, output_dir)


if __name__ == "__main__":
    run_cli(main)
