#!/usr/bin/env python3
"""Benchmark the training recipes: the same short runs with the default recipe (``auto``), the old defaults
(``--recipe imagenet``) and hand-tuned flags, on generated worlds of different shapes; prints val top-1 side by side.

Each world is made by tools/make_synthetic_artists.py (a long-tailed one by removing images from the later
artists) and split by prepare_dataset.py; every run is ``train_artist_style.py`` as a user would type it, with only
the data, run length and machine flags plus the variant's own. Slow on a CPU: run it in the background.

    nohup python bench/bench_recipe.py --work-dir /tmp/bench_recipe > bench_recipe.log 2>&1 &

``--medium`` benchmarks the fine-grained long-tail worlds of tools/make_medium_world.py instead (issue 26): the
newcomer's command (``--epochs 30`` and nothing else: the recipe picks the batch, 32 for 126 training images)
with the recipe now, with ``--crop-scale 0.5`` (a candidate kept as a flag only), with
``--sampler class-balanced`` (measured, not the default: docs/training.md), and with the settings from before issue
26 given as flags, beside hand-written image statistics + logistic regression on
the same split; top-1, macro recall and the recall of the three artists with the fewest training images
(``report_per_class.csv``).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.style_statistics import style_statistics
from artifacts.run_folder import read_log_records
from training.report import PER_CLASS_FILE
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]  # the scripts run from here

# name: (artists, images per artist of the first artist, share kept by each later artist: 1.0 = balanced)
WORLDS = {
    "6 artists x 24": (6, 24, 1.0),
    "12 artists x 12": (12, 12, 1.0),
    "long tail 6 artists 40..6": (6, 40, 0.68),
}

# fine-grained long-tail worlds (tools/make_medium_world.py): name: (families, seed); 12 artists, 30..6 images
MEDIUM_WORLDS = {
    "medium 4 media x 3, seed 0": (("ink", "dots", "paint", "pixel"), 0),
    "medium ink+dots 2 x 6, seed 1": (("ink", "dots"), 1),
    "medium 4 media x 3, seed 2": (("ink", "dots", "paint", "pixel"), 2),
    "medium paint+pixel 2 x 6, seed 3": (("paint", "pixel"), 3),
    "medium ink+dots 2 x 6, seed 5": (("ink", "dots"), 5),
    "medium paint+pixel 2 x 6, seed 6": (("paint", "pixel"), 6),
}


def image_statistics(path: Path) -> np.ndarray:
    """:func:`analysis.style_statistics.style_statistics` of one image file."""
    with Image.open(path) as image:
        return style_statistics(np.asarray(image.convert("RGB"), np.float32) / 255)


def statistics_baseline(dataset: Path) -> np.ndarray:
    """Per-class recall on ``val/`` of a logistic regression on :func:`image_statistics` fitted on ``train/``."""
    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        names = sorted(p.name for p in (dataset / split).iterdir() if p.is_dir())
        pairs = [(image_statistics(f), c) for c, n in enumerate(names) for f in sorted((dataset / split / n).iterdir())]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    (x, y), (xv, yv) = features("train"), features("val")
    predicted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y).predict(xv)
    return np.array([np.mean(predicted[yv == c] == c) for c in range(y.max() + 1)])


def hand_tuned(lr: str) -> list[str]:
    """The issue's hand-tuned flags on top of the old defaults: an absolute LR, no warm-up, cool-down, repeated
    augmentation, mixup / cutmix, erasing or EMA (what `make demo` passed before the recipe, plus no mixing)."""
    return ["--recipe", "imagenet", "--lr-abs", lr, "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--no-repeated-aug", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-model-ema"]


# the settings the recipe chose before issue 26, given as flags (what "before" means on the medium worlds)
BEFORE_26 = ["--input-size", "224", "--aa", "rand-m9-mstd0.5-inc1", "--color-jitter", "0.4", "--epoch-repeats", "1"]
# candidates measured for the long tail and kept as flags only (docs/training.md)
MEDIUM_VARIANTS = {"recipe now (auto)": [], "crops of at least half the image": ["--crop-scale", "0.5"],
                   "class-balanced sampler": ["--sampler", "class-balanced"], "before issue 26": BEFORE_26}

VARIANTS = {
    "default (auto)": [],
    "old defaults (imagenet)": ["--recipe", "imagenet"],
    "hand-tuned lr 2e-3": hand_tuned("2e-3"),
    "hand-tuned lr 4e-3": hand_tuned("4e-3"),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_recipe.py", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="bench_recipe_run", help="worlds and run folders go here")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16, help="of the distinct-style worlds (--medium runs: the "
                        "recipe's)")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96, help="side of the generated images")
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one CPU thread)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--medium", nargs="*", default=None, choices=list(MEDIUM_WORLDS), metavar="WORLD",
                        help=f"the fine-grained long-tail worlds instead (none named: all): {', '.join(MEDIUM_WORLDS)}")
    parser.add_argument("--medium-variants", nargs="+", default=list(MEDIUM_VARIANTS), choices=list(MEDIUM_VARIANTS))
    return parser


def run(command: list, log: Path) -> None:
    """Run a step with one CPU thread per process (oversubscribed OpenMP threads are many times slower)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{command[0]} failed (exit {result.returncode}); see {log}")


def make_world(name: str, work: Path, args: argparse.Namespace) -> Path:
    """Generate and split the world (reused when it exists); returns the prepared dataset folder."""
    artists, first, share = WORLDS[name]
    folder = work / name.replace(" ", "_").replace(".", "")
    dataset = folder / "dataset"
    if (dataset / "class_mapping.csv").is_file():
        return dataset
    raw = folder / "raw"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run(["tools/make_synthetic_artists.py", "--output-dir", raw, "--num-artists", artists, "--images-per-artist",
         first, "--size", args.image_size, "--seed", args.seed, "--overwrite"], folder / "generate.log")
    for index, artist in enumerate(sorted(p for p in raw.iterdir() if p.is_dir())):
        keep = max(6, round(first * share ** index))
        for extra in sorted(artist.iterdir())[keep:]:
            extra.unlink()
    run(["prepare_dataset.py", "--source-dir", raw, "--output-dir", dataset, "--seed", args.seed, "--yes",
         "--min-images", 2], folder / "prepare.log")
    return dataset


def train(dataset: Path, variant: str, args: argparse.Namespace) -> tuple[float, float]:
    """One run; returns (best validation top-1 of the model or its EMA, seconds)."""
    out = dataset.parent / ("run_" + variant.split(" (")[0].replace(" ", "_").replace("-", "_"))
    started = time.time()
    if not (out / "done.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run(["train_artist_style.py", "--data-path", dataset, "--output-dir", out, "--device", "cpu",
             "--epochs", args.epochs, "--batch-size", args.batch_size, "--input-size", args.input_size,
             "--num-workers", 0, "--seed", args.seed, *VARIANTS[variant]], out / "train.log")
        (out / "done.json").write_text(json.dumps({"seconds": time.time() - started}))
    records = read_log_records(out)
    top1 = max(max(r.get("val_acc1", 0.0), r.get("ema_val_acc1", 0.0)) for r in records)
    return top1, json.loads((out / "done.json").read_text())["seconds"]


def make_medium_world(name: str, work: Path) -> Path:
    """Generate (tools/make_medium_world.py, 96 px) and split (30% held out, split seed 0) a medium world; reused
    when it exists."""
    families, seed = MEDIUM_WORLDS[name]
    folder = work / name.replace(" ", "_").replace(",", "").replace("+", "_")
    dataset = folder / "dataset"
    if not (dataset / "class_mapping.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        run(["tools/make_medium_world.py", "--output-dir", folder / "raw", "--families", *families, "--seed", seed],
            folder / "generate.log")
        run(["prepare_dataset.py", "--source-dir", folder / "raw", "--output-dir", dataset, "--seed", 0,
             "--yes", "--min-images", 2, "--val-ratio", 0.3], folder / "prepare.log")
    return dataset


def tail_row(recall: np.ndarray, train: np.ndarray, val: np.ndarray) -> list[str]:
    """Top-1, macro recall, the recall of the three artists with the fewest training images, the lowest recall."""
    fewest = np.argsort(train, kind="stable")[:3]
    return [f"{np.sum(recall * val) / val.sum():.2f}", f"{recall.mean():.2f}",
            ", ".join(f"{recall[i]:.2f}" for i in fewest), f"{recall.min():.2f}"]


def train_medium(dataset: Path, variant: str) -> list[str]:
    """The newcomer's run (30 epochs, the recipe's batch, seed 0) with the variant's flags; its row from
    ``report_per_class.csv``."""
    out = dataset.parent / ("run_" + variant.split(" (")[0].replace(" ", "_"))
    if not (out / PER_CLASS_FILE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run(["train_artist_style.py", "--data-path", dataset, "--output-dir", out, "--device", "cpu", "--epochs", 30,
             "--num-workers", 0, *MEDIUM_VARIANTS[variant]], out / "train.log")
    table = np.genfromtxt(out / PER_CLASS_FILE, delimiter=",", skip_header=1, usecols=(1, 2, 3))
    return tail_row(table[:, 2], table[:, 0], table[:, 1])


def medium_main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir).resolve()
    names = args.medium or list(MEDIUM_WORLDS)
    print("| world | method | val top-1 | macro recall | fewest-image three artists' recall | lowest |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for name in names:
        dataset = make_medium_world(name, work)
        recall = statistics_baseline(dataset)
        train, val = ([len(list(p.iterdir())) for p in sorted((dataset / split).iterdir()) if p.is_dir()]
                      for split in ("train", "val"))
        print(f"| {name} | image statistics + logistic regression | "
              + " | ".join(tail_row(recall, np.array(train), np.array(val))) + " |", flush=True)
        for variant in args.medium_variants:
            print(f"| {name} | {variant} | " + " | ".join(train_medium(dataset, variant))
                  + " |", flush=True)


def main(args: argparse.Namespace) -> None:
    if args.medium is not None:
        return medium_main(args)
    work = Path(args.work_dir).resolve()
    datasets = {name: make_world(name, work, args) for name in args.worlds}
    jobs = [(world, variant) for world in args.worlds for variant in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda job: train(datasets[job[0]], job[1], args), jobs), strict=True))
    print(f"val top-1 (%), best epoch of model or EMA; {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.input_size} px, CPU\n")
    print("| world | " + " | ".join(args.variants) + " |")
    print("| --- |" + " --- |" * len(args.variants))
    for world in args.worlds:
        cells = [f"{results[world, v][0]:.1f}" for v in args.variants]
        print(f"| {world} | " + " | ".join(cells) + " |")
    print(f"\nseconds per run: {sum(s for _, s in results.values()) / len(results):.0f} on average")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
