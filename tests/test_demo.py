"""The whole chain of `make demo`, shortened: generate -> prepare -> train -> inference -> cluster -> compare ->
unseen artists (gallery, identification, similar works)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--num-artists", "4", "--images-per-artist", "12", "--image-size", "64", "--input-size", "64",
         "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]


def run_demo(work_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "tools/run_demo.py", "--work-dir", str(work_dir), *QUICK, *extra],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_shortened_demo_runs_the_whole_chain_and_reuses_its_work(tmp_path):
    work = tmp_path / "demo"
    first = run_demo(work, "--min-top1", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "demo summary" in first.stdout and "adjusted Rand index" in first.stdout

    names = (work / "inference" / "image_names.txt").read_text(encoding="utf-8").splitlines()
    features = np.load(work / "inference" / "features.npy")
    assert features.shape == (len(names), 256) and len(names) == 8  # 4 artists x 2 validation images
    assignments = json.loads((work / "clusters" / "cluster_assignments.json").read_text(encoding="utf-8"))
    assert assignments["num_clusters"] == 4 and sorted(i["name"] for i in assignments["images"]) == sorted(names)
    ranking = json.loads((work / "similar.json").read_text(encoding="utf-8"))
    assert json.dumps(ranking).count(names[0]) >= 1  # the query (row 0) finds itself
    # Artists never trained on: 3 enrolled from 3 references each (3 query images each), 1 left unknown (8 queries).
    unseen = json.loads((work / "unseen_metrics.json").read_text(encoding="utf-8"))["identification"]
    assert (unseen["num_gallery_artists"], unseen["num_known_queries"], unseen["num_unknown_queries"]) == (3, 9, 8)
    assert unseen["unknown_threshold"] is not None and 0 <= unseen["unknown_detection_rate"] <= 1
    assert "unseen artists, gallery    top-1" in first.stdout and "marked unknown" in first.stdout
    works = json.loads((work / "similar_works.json").read_text(encoding="utf-8"))["results"]
    assert len(works) == 5 and all(Path(w["path"]).parent.parent == work / "unseen" / "refs" for w in works)
    for path in ("model/model_best.pth", "model/config.json", "model/class_mapping.csv", "dataset/split_info.txt"):
        assert (work / path).exists(), path

    # A second run reuses every step; an unreachable accuracy bar makes it fail with a one-line error.
    second = run_demo(work, "--min-top1", "101")
    assert second.returncode == 2
    assert second.stdout.count("(reusing the earlier result of:") == 10
    assert second.stderr.strip().startswith("error: validation top-1") and "Traceback" not in second.stderr


@pytest.mark.slow
def test_shortened_multilabel_demo(tmp_path):
    work = tmp_path / "demo"
    result = run_demo(work, "--multilabel", "--min-map-gain", "-1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation macro mAP" in result.stdout and "label-frequency baseline" in result.stdout
    train_rows = (work / "multilabel" / "train.csv").read_text(encoding="utf-8").splitlines()
    val_rows = (work / "multilabel" / "val.csv").read_text(encoding="utf-8").splitlines()
    assert train_rows[0] == val_rows[0] == "image_path,labels" and len(train_rows) > len(val_rows) > 1
    predictions = json.loads((work / "multilabel_predictions.json").read_text(encoding="utf-8"))
    assert predictions["num_images"] == len(train_rows) + len(val_rows) - 2
    for entry in predictions["results"].values():
        assert abs(sum(label["ratio"] for label in entry["labels"]) - 1) < 1e-6
    assert (work / "model_multilabel" / "label_stats.csv").exists()
