#!/usr/bin/env python3
"""Compare training losses for style embeddings on artists the model never saw (generated data, CPU).

For each ``--losses`` entry: train lsnet_t_artist on ``--trained`` generated artists; for each style vector (pooled,
texture) enroll ``--enrolled`` other artists in a gallery from ``--refs`` images each, calibrate the per-artist unknown
thresholds (5% false unknown) on ``--calib`` held-out images of each, then measure on new images of the enrolled
artists and of ``--unknown`` artists outside the gallery: retrieval (Recall@1, mAP@R, leave-one-out among the query
images), identification top-1 and the share of unknown artists' images marked unknown at the calibrated thresholds.
Every loss sees the same images and seed.

    python bench/bench_embeddings.py --output bench_embeddings.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from predictor import load_model_bundle
from retrieval.metrics import retrieval_metrics
from retrieval.references import artist_images, artist_of, embed_images
from tools import build_gallery, evaluate_retrieval
from tools.make_synthetic_artists import generate_artists
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]  # the scripts run from here

RUN = ["--device", "cpu", "--num-workers", "0"]
# What the losses share: no mixup / RandAugment / erasing (the metric losses need each image's own label), no colour
# jitter (the palette is part of a style: jitter halved the trained artists' val accuracy), and the backbone's own
# style vectors (the default, no --feature-dim projection). The learning rate is the recipe's (4e-3 at batch 16): the
# earlier --lr 1.0 (3e-2) left BatchNorm running statistics hundreds of times too large after a few dozen steps,
# so eval-mode vectors were near chance on the trained artists themselves.
TRAIN = [*RUN, "--model", "lsnet_t_artist", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--print-freq", "1000",
         "--batch-size", "16", "--aa", "none", "--color-jitter", "0", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
         "--smoothing", "0", "--no-repeated-aug"]
LOSS_FLAGS = {"ce": [], "arcface": ["--sampler", "class-balanced", "--samples-per-class", "4"],
              "subcenter-arcface": ["--sampler", "class-balanced", "--samples-per-class", "4", "--subcenters", "3"],
              "supcon": ["--sampler", "class-balanced", "--samples-per-class", "4"]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="ce,arcface,subcenter-arcface,supcon", help="comma-separated --loss names")
    parser.add_argument("--trained", type=int, default=24, help="artists the model is trained on")
    parser.add_argument("--enrolled", type=int, default=6, help="unseen artists enrolled in the gallery")
    parser.add_argument("--unknown", type=int, default=4, help="unseen artists outside the gallery")
    parser.add_argument("--train-images", type=int, default=6, help="training images per trained artist")
    parser.add_argument("--refs", type=int, default=8, help="reference images per enrolled artist")
    parser.add_argument("--calib", type=int, default=8, help="calibration images per enrolled artist")
    parser.add_argument("--queries", type=int, default=6, help="query images per unseen artist")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--input-size", type=int, default=64, help="image side (generated and trained at)")
    parser.add_argument("--lr-abs", type=float, default=4e-3, help="learning rate (AdamW, batch 16)")
    parser.add_argument("--feature-dim", type=int, default=None,
                        help="style-vector size (default: the backbone's, no projection)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output", default="bench_embeddings.json", help="JSON report")
    return parser


def make_world(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """train/ + val/ of the trained artists; refs/, calib/ (enrolled artists) and queries/ (enrolled + unknown)."""
    total = args.trained + args.enrolled + args.unknown
    size = args.input_size
    generate_artists(root / "data" / "train", args.trained, args.train_images, size, seed=args.seed)
    generate_artists(root / "data" / "val", args.trained, 2, size, seed=args.seed + 1)
    for part, count, seed in (("refs", args.refs, 2), ("calib", args.calib, 4), ("queries", args.queries, 3)):
        names = generate_artists(root / part, total, count, size, seed=args.seed + seed)["artists"]
        outside = names[:args.trained] + (names[args.trained + args.enrolled:] if part != "queries" else [])
        for name in outside:
            shutil.rmtree(root / part / name)
    return {name: root / name for name in ("data", "refs", "calib", "queries")}


def measure(loss: str, world: dict[str, Path], work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train with ``loss``; per style vector (pooled, texture) build and calibrate a gallery, and evaluate retrieval
    and open-set identification."""
    run_dir, started = work / loss / "run", time.time()
    subprocess.run(  # as a user runs it
        [sys.executable, "train_artist_style.py", *TRAIN, "--loss", loss, *LOSS_FLAGS[loss], "--epochs",
         str(args.epochs), "--seed", str(args.seed), "--input-size", str(args.input_size), "--lr-abs",
         str(args.lr_abs), "--data-path", str(world["data"]), "--output-dir", str(run_dir),
         *(["--feature-dim", str(args.feature_dim)] if args.feature_dim else [])],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    train_seconds = time.time() - started
    rows = []
    for descriptor in ("pooled", "texture"):
        gallery = work / loss / f"gallery_{descriptor}"
        build_gallery.main(build_gallery.get_args_parser().parse_args(
            ["--checkpoint", str(run_dir), "--images", str(world["refs"]), "--output-dir", str(gallery),
             "--calibrate", str(world["calib"]), "--descriptor", descriptor, *RUN]))
        ident = evaluate_retrieval.main(evaluate_retrieval.get_args_parser().parse_args(
            ["--gallery", str(gallery), "--queries", str(world["queries"]), "--checkpoint", str(run_dir),
             "--output", str(work / loss / f"identification_{descriptor}.json"), *RUN]))["identification"]
        bundle = load_model_bundle(str(run_dir), device="cpu")
        bundle.use_descriptor(descriptor)
        names, vectors = embed_images(bundle, world["queries"], artist_images(world["queries"]), 32, 0)
        retrieval = retrieval_metrics(vectors, [artist_of(name, str(world["queries"])) for name in names])
        rows.append({"loss": loss, "descriptor": descriptor, "recall@1": retrieval["recall@1"],
                     "map@r": retrieval["map@r"], "top1": ident["top1"],
                     "unknown_detection": ident["unknown_detection_rate"],
                     "false_unknown": ident["false_unknown_rate"], "train_seconds": round(train_seconds, 1)})
    return rows


HEADER = (f"{'loss':<18} {'vector':<8} {'Recall@1':>8} {'mAP@R':>7} {'top-1':>6} {'unknown':>8} {'false unk':>9} "
          f"{'train s':>8}")


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['loss']:<18} {r['descriptor']:<8} {r['recall@1']:>8.3f} {r['map@r']:>7.3f} {r['top1']:>6.3f} "
            f"{r['unknown_detection']:>8.3f} {r['false_unknown']:>9.3f} {r['train_seconds']:>8.1f}")


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_embeddings_") as tmp:
        world = make_world(Path(tmp) / "world", args)
        for loss in args.losses.split(","):
            rows.extend(measure(loss.strip(), world, Path(tmp) / "runs", args))
            for row in rows[-2:]:
                print(f"result: {format_row(row)}", flush=True)
    print(f"unseen artists: {args.enrolled} enrolled ({args.refs} refs each), {args.unknown} unknown; chance top-1 "
          f"{1 / args.enrolled:.3f}\n{HEADER}")
    for r in rows:
        print(format_row(r))
    Path(args.output).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2) + "\n",
                                 encoding="utf-8")
    return rows


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
