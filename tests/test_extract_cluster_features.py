"""tools/extract_cluster_features.py: clustering saved or freshly extracted features, outputs, error paths."""

import json
import subprocess
import sys
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
import timm
import torch

import model  # noqa: F401  (registers the models)
from predictor import load_model_bundle
from tools.extract_cluster_features import get_args_parser, main
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def separated_groups(num_groups: int = 3, per_group: int = 8, dim: int = 12, seed: int = 0):
    """Vectors around ``num_groups`` orthogonal directions (lengths vary, so only cosine groups them)."""
    rng = np.random.default_rng(seed)
    features, names = [], []
    for g in range(num_groups):
        direction = np.zeros(dim)
        direction[g] = 1.0
        for i in range(per_group):
            vector = direction + rng.normal(0, 0.05, dim)
            features.append(vector * rng.uniform(0.5, 5.0))
            names.append(f"group{g}/img_{i}.png")
    order = rng.permutation(len(names))  # interleave the groups
    return np.asarray(features, np.float32)[order], [names[i] for i in order]


@pytest.fixture
def saved_features(tmp_path):
    features, names = separated_groups()
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "image_names.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return tmp_path


def group_of(name: str) -> str:
    return name.split("/")[0]


@pytest.mark.parametrize("num_clusters", ["3", "auto"])
def test_saved_features_recover_the_groups(saved_features, num_clusters, capsys):
    out = saved_features / "clusters"
    run("--features", saved_features / "features.npy", "--output-dir", out, "--num-clusters", num_clusters)
    report = json.loads((out / "cluster_assignments.json").read_text())
    assert report["num_clusters"] == 3 and report["silhouette"] > 0.8
    groups = sorted(sorted({group_of(f) for f in c["files"]}) for c in report["clusters"])
    assert groups == [["group0"], ["group1"], ["group2"]]
    assert [c["size"] for c in report["clusters"]] == [8, 8, 8]
    names = (out / "image_names.txt").read_text().splitlines()
    assert names == (saved_features / "image_names.txt").read_text().splitlines()
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(saved_features / "features.npy"))
    by_image = {entry["name"]: entry["cluster"] for entry in report["images"]}
    for cluster in report["clusters"]:
        assert all(by_image[f] == cluster["id"] for f in cluster["files"])
    if num_clusters == "auto":
        assert "chose k=3" in capsys.readouterr().out and report["auto_k"]["chosen"] == 3


def test_images_dir_extracts_with_the_model(tmp_path):
    net = timm.create_model("lsnet_t_artist", num_classes=2, feature_dim=8).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": net.state_dict(), "args": {"model": "lsnet_t_artist", "input_size": 64}},
               tmp_path / "model_best.pth")
    images = tmp_path / "images"
    for i, name in enumerate(["x/same.png", "y/same.png", "2.png", "3.png"]):
        gen.noise_image(images / name, (72, 64), seed=i)
    gen.truncated_jpeg(images / "broken.jpg")
    out = tmp_path / "clusters"
    run("--images-dir", images, "--checkpoint", tmp_path / "model_best.pth", "--num-clusters", "2",
        "--output-dir", out, "--num-workers", "0", "--no-l2-normalize")
    names = (out / "image_names.txt").read_text().splitlines()
    assert names == ["2.png", "3.png", "x/same.png", "y/same.png"]
    features = np.load(out / "features.npy")
    bundle = load_model_bundle(tmp_path / "model_best.pth")
    np.testing.assert_allclose(features, bundle.extract_features([images / n for n in names]), rtol=1e-5, atol=1e-6)
    report = json.loads((out / "cluster_assignments.json").read_text())
    assert report["num_images"] == 4 and sum(c["size"] for c in report["clusters"]) == 4


def test_more_clusters_than_images_is_a_one_line_error(saved_features):
    proc = subprocess.run(
        [sys.executable, "tools/extract_cluster_features.py", "--features", str(saved_features / "features.npy"),
         "--output-dir", str(saved_features / "out"), "--num-clusters", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: asked for 30 clusters but there are only 24 vectors; use at most 24 clusters (or 'auto')"]
    assert not (saved_features / "out").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["--features", "f.npy", "--images-dir", "."], "pass either --images-dir (with --checkpoint) or --features"),
    (["--images-dir", "."], "--images-dir needs --checkpoint"),
    (["--features", "missing.npy"], "vector file missing.npy does not exist"),
])
def test_input_errors(tmp_path, argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run(*argv, "--output-dir", "out"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
