#!/usr/bin/env python3
"""The whole workflow on a generated synthetic artist dataset: what ``make demo`` runs.

Each step runs the real script as a user would (the command is printed first), in ``--work-dir``:
generate -> prepare_dataset.py -> train_artist_style.py -> inference_artist.py --mode both ->
tools/extract_cluster_features.py -> tools/compare_vectors.py -> artists never trained on (generate them,
tools/build_gallery.py from a few references each, tools/evaluate_retrieval.py, tools/search_similar.py), then a
summary; with ``--multilabel``:
generate blends -> tools/split_multilabel_dataset.py -> train_artist_multilabel.py ->
predict_artist_multilabel.py. Steps whose outputs already exist for the same settings are reused, so a
second run is quick. Exits non-zero when validation top-1 is below ``--min-top1`` (multi-label: when macro
mAP does not beat the label-frequency baseline by ``--min-map-gain``).
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from artifacts.run_folder import LOG_FILE, read_log_records
from data.class_mapping import read_class_mapping
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
# What the summary suggests for the user's own data (tests/test_readme.py checks these commands like the READMEs').
# The run length is explicit: the training default (--epochs 300) is the ImageNet recipe's.
OWN_DATA = """on your own data (one folder of images per artist)
  python prepare_dataset.py --source-dir /path/to/artists --output-dir artist_dataset
  python train_artist_style.py --data-path artist_dataset --model lsnet_t_artist --output-dir runs/artist \\
      --pretrained --epochs 100
  python inference_artist.py --mode both --checkpoint runs/artist --input /path/to/images --output results
  python tools/extract_cluster_features.py --features results/features.npy --names results/image_names.txt \\
      --num-clusters auto --output-dir clusters
  python tools/build_gallery.py --checkpoint runs/artist --images refs --output-dir gallery --calibrate val_refs
  python inference_artist.py --checkpoint runs/artist --gallery gallery --input /path/to/images --output results"""
OWN_DATA_MULTILABEL = """on your own data (a .txt of labels beside each image, e.g. "(artist_a:0.7),(artist_b:0.3)")
  python tools/split_multilabel_dataset.py --input-dir images --train-csv train.csv --val-csv val.csv --relative-paths
  python train_artist_multilabel.py --data-path images --train-ann train.csv --val-ann val.csv \\
      --output-dir runs/mixed --epochs 100
  python predict_artist_multilabel.py --checkpoint runs/mixed --inputs new_images --output predictions.json \\
      --normalize-ratio"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="demo_run", help="where every output of the demo goes")
    parser.add_argument("--num-artists", type=int, default=8)
    parser.add_argument("--images-per-artist", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--input-size", type=int, default=128, help="training/inference input size")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=256)
    parser.add_argument("--unseen-artists", type=int, default=4,
                        help="artists never trained on: all but one enrolled in a gallery, the last one unknown")
    parser.add_argument("--min-top1", type=float, default=80.0, help="fail below this validation top-1 (percent)")
    parser.add_argument("--multilabel", action="store_true",
                        help="run the multi-label demo (style blends with weighted labels) instead")
    parser.add_argument("--min-map-gain", type=float, default=0.15,
                        help="multi-label: fail unless macro mAP beats the label-frequency baseline by this much")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2, help="data loading processes")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, else cpu)")
    return parser


class Demo:
    """Runs the steps as subprocesses, printing each command, and skips steps already done with the same settings."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = work_dir / "demo_state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def step(self, title: str, command: list[str], settings: dict, outputs: list[Path]) -> None:
        """Run ``command`` unless the same settings already produced ``outputs``."""
        print(f"\n== {title}", flush=True)
        shown = " ".join(shlex.quote(str(c)) for c in ["python", *command[1:]])
        if self.state.get(title) == settings and all(p.exists() for p in outputs):
            print(f"(reusing the earlier result of: {shown})", flush=True)
            return
        print(f"$ {shown}", flush=True)
        start = time.time()
        result = subprocess.run([str(c) for c in command], cwd=ROOT)
        if result.returncode != 0:
            raise UserError(f"step '{title}' failed (exit {result.returncode}); see the output above")
        print(f"({time.time() - start:.0f} s)", flush=True)
        self.state[title] = settings
        self.state_file.write_text(json.dumps(self.state, indent=2))


def cluster_agreement(assignments_file: Path) -> tuple[float, float]:
    """Adjusted Rand index and NMI between the clusters and the true artists (the first folder of each name)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    images = json.loads(assignments_file.read_text(encoding="utf-8"))["images"]
    artists = [item["name"].split("/")[0] for item in images]
    clusters = [item["cluster"] for item in images]
    return adjusted_rand_score(artists, clusters), normalized_mutual_info_score(artists, clusters)


def label_frequency_baseline(val_csv: Path) -> float:
    """Macro mAP of a constant predictor (each label scored by its frequency): what any model must beat.

    A constant score ranks all images alike, so a label's average precision is its share of positives.
    """
    from data.multilabel import read_multilabel_csv

    rows = read_multilabel_csv(val_csv)
    labels = sorted({label for _, targets in rows for label in targets})
    return float(np.mean([sum(label in targets for _, targets in rows) / len(rows) for label in labels]))


def best_logged(model_dir: Path, key: str) -> float:
    """Best value of ``key`` over the epochs of ``train_log.txt``."""
    values = [row[key] for row in read_log_records(model_dir) if row.get(key) is not None]
    if not values:
        raise UserError(f"{model_dir / LOG_FILE} holds no {key}")
    return max(values)


def generate(demo: Demo, args: argparse.Namespace, raw: Path, mix: bool) -> dict:
    """The generation step (shared by both demos); returns the settings that later steps depend on."""
    settings = {k: getattr(args, k) for k in ("num_artists", "images_per_artist", "image_size", "seed")}
    demo.step("generate a synthetic artist dataset" + (" with style blends" if mix else ""), [
        sys.executable, "tools/make_synthetic_artists.py", "--output-dir", raw, "--num-artists", args.num_artists,
        "--images-per-artist", args.images_per_artist, "--size", args.image_size, "--seed", args.seed,
        "--overwrite", *(["--mix"] if mix else []),
    ], settings, [raw])
    return settings


def device_flags(args: argparse.Namespace) -> list:
    """``--device`` when one was asked for (else the scripts pick CUDA when available)."""
    return ["--device", args.device] if args.device else []


def training_flags(args: argparse.Namespace) -> list:
    """Flags both demo trainings share: the data, run length and machine only (the recipe picks the rest)."""
    return ["--model", "lsnet_t_artist", "--input-size", args.input_size, "--feature-dim", args.feature_dim,
            "--epochs", args.epochs, "--batch-size", args.batch_size, "--num-workers", args.num_workers,
            "--seed", args.seed, *device_flags(args)]


def single_label_demo(args: argparse.Namespace, demo: Demo, work: Path) -> tuple[str, str]:
    """generate -> prepare -> train -> inference (both) -> cluster -> compare; returns the summary and pass/fail."""
    py = sys.executable
    raw, dataset, model_dir = work / "raw", work / "dataset", work / "model"
    inference, clusters = work / "inference", work / "clusters"
    data_settings = generate(demo, args, raw, mix=False)
    demo.step("prepare the train/val split", [
        py, "prepare_dataset.py", "--source-dir", raw, "--output-dir", dataset, "--seed", args.seed, "--yes",
        "--min-images", 2,
    ], data_settings, [dataset / "class_mapping.csv"])
    train_settings = {**data_settings, **{k: getattr(args, k) for k in (
        "input_size", "epochs", "batch_size", "feature_dim", "device")}}
    demo.step("train lsnet_t_artist", [
        py, "train_artist_style.py", "--data-path", dataset, "--output-dir", model_dir, *training_flags(args),
    ], train_settings, [model_dir / "model_best.pth"])
    demo.step("classify and extract features of the validation images", [
        py, "inference_artist.py", "--mode", "both", "--checkpoint", model_dir, "--input", dataset / "val",
        "--output", inference, "--num-workers", args.num_workers, *device_flags(args),
    ], train_settings, [inference / "features.npy"])
    demo.step("cluster the style features", [
        py, "tools/extract_cluster_features.py", "--features", inference / "features.npy",
        "--names", inference / "image_names.txt", "--num-clusters", args.num_artists, "--output-dir", clusters,
        "--seed", args.seed,
    ], train_settings, [clusters / "cluster_assignments.json"])
    query = work / "query_vector.npy"
    np.save(query, np.load(inference / "features.npy")[:1])
    demo.step("find the works closest in style to the first validation image", [
        py, "tools/compare_vectors.py", "--query-vector", query, "--reference-vectors", inference / "features.npy",
        "--names", inference / "image_names.txt", "--top-k", 5, "--output", work / "similar.json",
    ], {**train_settings, "query": 0}, [work / "similar.json"])

    unseen = unseen_artists_step(args, demo, work, model_dir, train_settings)
    top1, (ari, nmi) = best_logged(model_dir, "val_acc1"), cluster_agreement(clusters / "cluster_assignments.json")
    ok = top1 >= args.min_top1
    verdict = "OK" if ok else "TOO LOW"
    summary = f"""validation top-1            {top1:.1f}%   (required: {args.min_top1:.0f}%)  {verdict}
clusters vs artists         adjusted Rand index {ari:.3f}, NMI {nmi:.3f}  ({args.num_artists} clusters)
{unseen}

where things are
  generated images          {raw}
  prepared dataset          {dataset}  (class_mapping.csv, dataset_info.json, split_info.txt)
  trained model folder      {model_dir}  (model_best.pth, checkpoint.pth, class_mapping.csv, config.json,
                            train_log.txt, report.html, TensorBoard events)
  predictions + features    {inference}  (batch_results.json, features.npy, image_names.txt)
  clusters                  {clusters / 'cluster_assignments.json'}
  nearest works in style    {work / 'similar.json'}
  gallery of unseen artists {work / 'gallery'}  (figures: {work / 'unseen_metrics.json'}, similar works:
                            {work / 'similar_works.json'})

{OWN_DATA}"""
    failure = f"validation top-1 {top1:.1f}% is below the required {args.min_top1:.0f}%"
    return summary, (failure if not ok else "")


UNSEEN_REFS, UNSEEN_CALIB = 3, 2  # per enrolled unseen artist: reference images, calibration images; rest: queries


def split_unseen(raw: Path, trained: set[str], out: Path) -> tuple[list[str], str]:
    """Sort the generated artists the model never saw into refs/, calib/ and queries/ (the last artist only into
    queries/: it stays outside the gallery); returns the enrolled artists and the unknown one."""
    artists = sorted(p.name for p in raw.iterdir() if p.is_dir() and p.name not in trained)
    if len(artists) < 2:
        raise UserError("--unseen-artists must be at least 2: some to enroll and one to stay unknown")
    shutil.rmtree(out, ignore_errors=True)
    for position, artist in enumerate(artists):
        files = sorted((raw / artist).iterdir())
        enrolled = position < len(artists) - 1
        parts = {"refs": files[:UNSEEN_REFS], "calib": files[UNSEEN_REFS:UNSEEN_REFS + UNSEEN_CALIB],
                 "queries": files[UNSEEN_REFS + UNSEEN_CALIB:]} if enrolled else {"queries": files}
        for part, chosen in parts.items():
            (out / part / artist).mkdir(parents=True)
            for file in chosen:
                shutil.copy2(file, out / part / artist / file.name)
    return artists[:-1], artists[-1]


def unseen_artists_step(args: argparse.Namespace, demo: Demo, work: Path, model_dir: Path, settings: dict) -> str:
    """Enroll artists the model never saw in a gallery from a few references, identify their other images, mark
    an artist outside the gallery unknown, and find similar works; returns the summary lines."""
    py, raw, unseen, gallery = sys.executable, work / "unseen_raw", work / "unseen", work / "gallery"
    per_artist = UNSEEN_REFS + UNSEEN_CALIB + 3
    unseen_settings = {**settings, "unseen_artists": args.unseen_artists}
    demo.step("generate artists the model never saw", [
        py, "tools/make_synthetic_artists.py", "--output-dir", raw, "--num-artists",
        args.num_artists + args.unseen_artists, "--images-per-artist", per_artist, "--size", args.image_size,
        "--seed", args.seed + 1, "--overwrite",
    ], unseen_settings, [raw])
    trained = set(read_class_mapping(model_dir / "class_mapping.csv"))
    enrolled, unknown = split_unseen(raw, trained, unseen)
    runtime = ["--num-workers", args.num_workers, *device_flags(args)]
    demo.step("enroll the unseen artists in a gallery from a few references each", [
        py, "tools/build_gallery.py", "--checkpoint", model_dir, "--images", unseen / "refs", "--output-dir", gallery,
        "--calibrate", unseen / "calib", *runtime,
    ], unseen_settings, [gallery])
    metrics_file = work / "unseen_metrics.json"
    demo.step("identify their other images; an artist outside the gallery should come out unknown", [
        py, "tools/evaluate_retrieval.py", "--gallery", gallery, "--queries", unseen / "queries", "--checkpoint",
        model_dir, "--output", metrics_file, *runtime,
    ], unseen_settings, [metrics_file])
    query = sorted((unseen / "queries" / enrolled[0]).iterdir())[0]
    demo.step("find the gallery works closest in style to one of their images", [
        py, "tools/search_similar.py", "--gallery", gallery, "--checkpoint", model_dir, "--query", query,
        "--top-k", 5, "--output", work / "similar_works.json", *runtime,
    ], unseen_settings, [work / "similar_works.json"])
    m = json.loads(metrics_file.read_text(encoding="utf-8"))["identification"]
    works = json.loads((work / "similar_works.json").read_text(encoding="utf-8"))["results"]
    same = sum(w["artist"] == enrolled[0] for w in works)
    return (f"unseen artists, gallery    top-1 {m['top1']:.2f} (chance {m['chance_top1']:.2f}) over "
            f"{len(enrolled)} artists never trained on, {UNSEEN_REFS} references each\n"
            f"unknown artist             {m['unknown_detection_rate']:.2f} of {unknown}'s images marked unknown "
            f"(false unknown {m['false_unknown_rate']:.2f}; texture style vectors, per-artist thresholds)\n"
            f"similar works              {same} of the {len(works)} works closest to one {enrolled[0]} image are "
            f"{enrolled[0]}'s")


def multilabel_demo(args: argparse.Namespace, demo: Demo, work: Path) -> tuple[str, str]:
    """generate blends with .txt labels -> split into CSVs -> train multi-label -> predict with ratios."""
    py = sys.executable
    raw, labels, model_dir = work / "raw_mix", work / "multilabel", work / "model_multilabel"
    mixed = raw / "mixed"
    data_settings = generate(demo, args, raw, mix=True)
    demo.step("split the labelled blends into training and validation CSVs", [
        py, "tools/split_multilabel_dataset.py", "--input-dir", mixed, "--train-csv", labels / "train.csv",
        "--val-csv", labels / "val.csv", "--val-ratio", 0.2, "--relative-paths", "--seed", args.seed, "--yes",
    ], data_settings, [labels / "val.csv"])
    train_settings = {**data_settings, **{k: getattr(args, k) for k in (
        "input_size", "epochs", "batch_size", "feature_dim", "device")}}
    demo.step("train a multi-label lsnet_t_artist", [
        py, "train_artist_multilabel.py", "--data-path", mixed, "--train-ann", labels / "train.csv",
        "--val-ann", labels / "val.csv", "--output-dir", model_dir, *training_flags(args),
    ], train_settings, [model_dir / "model_best.pth"])
    predictions = work / "multilabel_predictions.json"
    demo.step("predict the style mix of every blend", [
        py, "predict_artist_multilabel.py", "--checkpoint", model_dir, "--inputs", mixed, "--output", predictions,
        "--normalize-ratio", "--num-workers", args.num_workers, *device_flags(args),
    ], train_settings, [predictions])

    map_macro = best_logged(model_dir, "val_map_macro")
    baseline = label_frequency_baseline(labels / "val.csv")
    ok = map_macro >= baseline + args.min_map_gain
    verdict = "OK" if ok else "TOO LOW"
    summary = f"""validation macro mAP        {map_macro:.3f}   {verdict}
label-frequency baseline    {baseline:.3f}   (required: at least +{args.min_map_gain:.2f} above it)

where things are
  blends + .txt labels      {mixed}
  annotation CSVs           {labels}  (train.csv, val.csv)
  trained model folder      {model_dir}  (model_best.pth, class_mapping.csv, label_stats.csv, config.json,
                            train_log.txt)
  predicted style mixes     {predictions}

{OWN_DATA_MULTILABEL}"""
    failure = f"validation macro mAP {map_macro:.3f} does not beat the label-frequency baseline {baseline:.3f} " \
              f"by {args.min_map_gain:.2f}"
    return summary, (failure if not ok else "")


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir).resolve()
    demo = Demo(work)
    started = time.time()
    run = multilabel_demo if args.multilabel else single_label_demo
    summary, failure = run(args, demo, work)
    print(f"\n================ demo summary ({time.time() - started:.0f} s) ================\n{summary}\n")
    if failure:
        raise UserError(f"{failure}: the demo did not learn the styles well enough (try --epochs {args.epochs * 2})")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
