#!/usr/bin/env python3
"""Predict the style mix of images with a multi-label artist model (``train_artist_multilabel.py``).

Per image, the labels whose sigmoid confidence reaches ``--threshold``, at most ``--top-k``, most confident first;
``--normalize-ratio`` adds each kept label's share of their confidence sum (``ratio``, summing to 1).
``--debug-full`` adds every label's confidence. Unreadable images are listed under ``skipped``.

Example::

    python predict_artist_multilabel.py --checkpoint runs/ml --inputs photo.jpg more_images/ --output preds.json \\
        --normalize-ratio

Loading, preprocessing, batching and the progress bar are those of ``inference_artist.py`` (:mod:`predictor`).
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.outputs import finite_results, prepare_output_dir, write_json_file
from inference.results import select_labels
from predictor import BatchedModel, SkippedImage, add_runtime_args, engine_options, list_images, load_model_bundle
from utils import NumberRange, UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, or a model folder (model_best.pth / best_checkpoint.pth / "
                             "checkpoint.pth + class_mapping.csv + config.json)")
    parser.add_argument("--class-mapping", default=None,
                        help="class_mapping.csv from training (default: the model folder's)")
    parser.add_argument("--inputs", nargs="+", required=True, help="image files and/or directories of images")
    parser.add_argument("--output", default="predictions.json", help="JSON file to write (default: predictions.json)")
    parser.add_argument("--top-k", type=NumberRange(int, 1), default=6,
                        help="labels kept per image at most (default: 6)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="minimum sigmoid confidence of a kept label (default: 0.05)")
    parser.add_argument("--normalize-ratio", action="store_true",
                        help="add 'ratio': the kept confidences rescaled to sum to 1")
    parser.add_argument("--debug-full", action="store_true", help="add every label's confidence ('all_confidences')")
    parser.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                        help="include sub-folders of the input directories (default: on, as inference_artist.py)")
    parser.add_argument("--batch-size", type=NumberRange(int, 1), default=32)
    parser.add_argument("--model", default=None,
                        help="architecture, e.g. lsnet_t_artist (default: recorded in config.json or the checkpoint)")
    parser.add_argument("--input-size", type=NumberRange(int, 16), default=None,
                        help="image size fed to the model (default: the checkpoint's training size)")
    return add_runtime_args(parser)


def collect_images(inputs: list[str], recursive: bool) -> tuple[list[str], list[str]]:
    """``(paths, names)`` of the image files among ``inputs`` and in its directories; a name is the path as given
    joined with the path inside the directory (forward slashes). An image named twice is run once."""
    found: dict[str, str] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            relative = list_images(path, recursive)
            if not relative:
                hint = "" if recursive else " (sub-folders were not searched: drop --no-recursive)"
                print(f"warning: no image files in {path}{hint}", file=sys.stderr)
            for rel in relative:
                found.setdefault((path / rel).as_posix(), str(path / rel))
        elif path.is_file():
            found.setdefault(path.as_posix(), str(path))
        else:
            raise UserError(f"input not found: {path}; pass image files and/or directories of images")
    if not found:
        raise UserError("no image files in the --inputs; image files end in .jpg, .png, .webp, ...")
    return list(found.values()), list(found)


def predict(artist_model: BatchedModel, paths: list[str], names: list[str], args: argparse.Namespace,
            skipped: list[SkippedImage]) -> dict[str, dict[str, Any]]:
    """``{name: {"labels": [...], "all_confidences": {...}}}`` for the readable images; unreadable ones go to
    ``skipped``. The model is a PyTorch one or an exported ONNX folder (same batching and skipped files)."""
    class_names = artist_model.class_names
    results: dict[str, dict[str, Any]] = {}
    for batch_names, logits in artist_model.logits_batches(paths, names, batch_size=args.batch_size,
                                                           num_workers=args.num_workers, skipped=skipped,
                                                           progress=True):
        confidences = 1.0 / (1.0 + np.exp(-logits))
        for name, row in zip(batch_names, confidences, strict=True):
            entry: dict[str, Any] = {"labels": select_labels(row, class_names, args.top_k, args.threshold,
                                                             args.normalize_ratio)}
            if args.debug_full:
                entry["all_confidences"] = dict(zip(class_names, row.tolist(), strict=True))
            results[name] = entry
    return results


def _number(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.3f}"  # None: a NaN written as null


def _describe(labels: list[dict[str, Any]]) -> str:
    if not labels:
        return "no label reaches the threshold"
    return ", ".join(f"{e['label']} {_number(e['confidence'])}"
                     + (f" (ratio {_number(e['ratio'])})" if "ratio" in e else "") for e in labels)


def _check_args(args: argparse.Namespace) -> Path:
    """Validate the numeric flags and prepare the output's folder; returns the output path."""
    for flag, value, minimum in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                                 ("--num-workers", args.num_workers, 0)):
        if value < minimum:
            raise UserError(f"{flag} must be at least {minimum}, got {value}")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold is a confidence between 0 and 1, got {args.threshold}")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; pass a .json file path")
    prepare_output_dir(output.parent)
    return output


def _load(args: argparse.Namespace) -> BatchedModel:
    artist_model = load_model_bundle(args.checkpoint, args.model, args.class_mapping, device=args.device,
                                     input_size=args.input_size, amp=args.amp, compile=args.compile,
                                     **engine_options(args))
    if artist_model.class_names is None:
        raise UserError(f"the label names of {artist_model.checkpoint} are unknown; pass --class-mapping with the "
                        "class_mapping.csv written by train_artist_multilabel.py")
    if not artist_model.config.get("multi_label"):
        print(f"warning: {artist_model.checkpoint} does not come from train_artist_multilabel.py: a single-label "
              "model's sigmoid confidences are not per-label probabilities", file=sys.stderr)
    return artist_model


def main(args: argparse.Namespace | None = None) -> dict[str, Any]:
    args = args if args is not None else get_args_parser().parse_args()
    output = _check_args(args)
    paths, names = collect_images(args.inputs, args.recursive)
    artist_model = _load(args)
    skipped: list[SkippedImage] = []
    results, nonfinite = finite_results(predict(artist_model, paths, names, args, skipped))
    record = {
        "model": artist_model.model_name, "checkpoint": str(artist_model.checkpoint),
        "input_size": artist_model.input_size, "threshold": args.threshold, "top_k": args.top_k,
        "normalize_ratio": args.normalize_ratio, "num_images": len(results), "num_skipped": len(skipped),
        "num_nonfinite": nonfinite, "results": results, "skipped": [asdict(item) for item in skipped],
    }
    write_json_file(output, record)  # replaced atomically: a failed write keeps the previous file
    if nonfinite:
        print(f"warning: {nonfinite} images have NaN or infinite confidences, written as null", file=sys.stderr)
    if len(results) == 1:
        name, entry = next(iter(results.items()))
        print(f"{name}: {_describe(entry['labels'])}")
    print(f"{len(results)} images, {len(skipped)} skipped; wrote {output}")
    return record


if __name__ == "__main__":
    run_cli(main)
