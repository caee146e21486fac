"""train_artist_multilabel.py on generated mixed-style sets, and the multi-label metric and loss weights.

The synthetic artists of tools/make_synthetic_artists.py are blended two at a time with known weights; a small
LSNet (32 px inputs, CPU) learns to name the blended styles in a few epochs.
"""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score
from test_train import ENV, read_log, train_straight_and_resumed

import predict_artist_multilabel
import train_artist_multilabel
from artifacts.checkpoint import load_checkpoint, load_checkpoint_file
from data import MultiLabelImageDataset, build_transform, read_multilabel_csv, write_multilabel_csv
from losses import multilabel_pos_weight
from tools import generate_multilabel_csv, split_multilabel_dataset
from tools.make_synthetic_artists import generate_artists
from training.config import AugmentConfig
from training.metrics import MultiLabelMetrics, average_precision
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_artist_multilabel.py")
FAST = ["--device", "cpu", "--model", "lsnet_t_artist", "--input-size", "32", "--feature-dim", "32",
        "--num-workers", "0", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--print-freq", "100",
        "--aa", "none", "--reprob", "0", "--color-jitter", "0", "--no-repeated-aug", "--model-ema-decay", "0.9"]
THRESHOLD = 0.4


# --------------------------------------------------------------------------------------------- metric and loss


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.5], [0.8, 0.5], [0.7, 0.5], [0.1, 0.2]])
    targets = torch.tensor([[True, False], [False, True], [True, False], [False, False]])
    ap = average_precision(scores, targets)
    # Label 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2. Label 1: three tied scores hold its one positive,
    # so they are one threshold with precision 1/3.
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 1 / 3])
    assert torch.isnan(average_precision(scores[:, :1], torch.zeros(4, 1, dtype=torch.bool))).all()


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_agree_with_sklearn(ties):
    gen = torch.Generator().manual_seed(int(ties))
    scores = torch.rand(50, 6, generator=gen)
    if ties:
        scores = (scores * 4).round() / 4
    targets = torch.rand(50, 6, generator=gen) < 0.3
    targets[:, 2] = False  # a label without a positive in this split
    logits = torch.logit(scores.clamp(1e-4, 1 - 1e-4))
    metric = MultiLabelMetrics(threshold=THRESHOLD)
    for rows in (slice(0, 20), slice(20, 50)):  # weighted soft targets: presence is target > 0
        metric.update(logits[rows], targets[rows] * torch.rand(targets[rows].shape, generator=gen).clamp(min=0.1))
    result = metric.compute()
    assert_matches_sklearn(result, logits.sigmoid().numpy(), targets.numpy())
    assert result["labels_without_positives"] == 1


def assert_matches_sklearn(result: dict, scores: np.ndarray, present: np.ndarray, tolerance: float = 1e-9) -> None:
    """``result`` (MultiLabelMetrics, or a logged record without prefix) equals scikit-learn on the same scores."""
    keep = present.any(axis=0)
    predicted = scores >= THRESHOLD
    expected = {
        "map_macro": average_precision_score(present[:, keep], scores[:, keep], average="macro"),
        "map_micro": average_precision_score(present, scores, average="micro"),
        "f1_macro": f1_score(present[:, keep], predicted[:, keep], average="macro", zero_division=0),
        "f1_micro": f1_score(present, predicted, average="micro", zero_division=0),
        "precision_macro": precision_score(present[:, keep], predicted[:, keep], average="macro", zero_division=0),
        "precision_micro": precision_score(present, predicted, average="micro", zero_division=0),
        "recall_macro": recall_score(present[:, keep], predicted[:, keep], average="macro", zero_division=0),
        "recall_micro": recall_score(present, predicted, average="micro", zero_division=0),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=tolerance), key


def test_pos_weight_is_negatives_over_positives_clipped():
    weights = multilabel_pos_weight(torch.tensor([50, 20, 1, 0, 100]), num_samples=100, max_weight=10)
    assert weights.tolist() == pytest.approx([1.0, 4.0, 10.0, 10.0, 0.1])


# --------------------------------------------------------------------------------------------- data and runs


def make_mixed_set(root: Path, num_artists: int, num_mixed: int, num_val: int) -> list[str]:
    """Blends of synthetic styles (48 px) split into ``train.csv`` / ``val.csv`` under ``root``; returns the
    ``--data-path --train-ann --val-ann`` arguments."""
    result = generate_artists(root, num_artists=num_artists, images_per_artist=1, size=48, mix=True,
                              num_mixed=num_mixed)
    rows = read_multilabel_csv(result["csv_path"])
    write_multilabel_csv(root / "train.csv", rows[num_val:])
    write_multilabel_csv(root / "val.csv", rows[:num_val])
    return ["--data-path", str(root), "--train-ann", str(root / "train.csv"), "--val-ann", str(root / "val.csv")]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process runs use one torch thread (the tests share a small machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(*argv: str):
    return train_artist_multilabel.main(train_artist_multilabel.get_args_parser().parse_args([*FAST, *argv]))


def run_script(*argv: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, SCRIPT, *FAST, *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def printed_eval(stdout: str) -> dict[str, dict]:
    """The ``--eval`` results printed as ``PATH (model weights): {...}``, by weight set."""
    return {line.split(" weights): ")[0].rsplit(" (", 1)[1]: json.loads(line.split(" weights): ", 1)[1])
            for line in stdout.splitlines() if " weights): " in line}


def val_presence(data: list[str]) -> tuple[MultiLabelImageDataset, np.ndarray]:
    """The validation set (labels of the training CSV) and its label presence matrix."""
    train = MultiLabelImageDataset(data[3], data[1], verbose=False)
    val = MultiLabelImageDataset(data[5], data[1], classes=train.classes,
                                 transform=build_transform(False, AugmentConfig().transform(32)))
    present = np.zeros((len(val), len(train.classes)), dtype=bool)
    for row, (_, indices, _) in enumerate(val.samples):
        present[row, list(indices)] = True
    return val, present


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> list[str]:
    return make_mixed_set(tmp_path_factory.mktemp("mixed"), num_artists=6, num_mixed=360, num_val=72)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> list[str]:
    return make_mixed_set(tmp_path_factory.mktemp("small"), num_artists=4, num_mixed=40, num_val=8)


@pytest.fixture(scope="module")
def trained(mixed_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Three epochs from the command line, with EMA."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_script(*mixed_data, "--output-dir", str(output_dir), "--epochs", "3", "--batch-size", "16",
                        "--lr", "1.0", "--threshold", str(THRESHOLD))
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, result


@pytest.mark.slow
def test_training_writes_every_output_and_beats_the_frequency_baseline(trained, mixed_data):
    output_dir, result = trained
    assert {p.name for p in output_dir.iterdir()} == {
        "checkpoint.pth", "model_best.pth", "class_mapping.csv", "label_stats.csv", "train_log.txt", "tensorboard",
        "args.json", "config.json", "report.html", "report_loss.png", "report_metric.png", "report_lr.png",
        "report_per_class.png"}
    assert "loss pos_weight per label (negatives / positives, clipped to 10; 0 clipped): " in result.stdout

    train_rows = read_multilabel_csv(mixed_data[3])
    labels = sorted({name for _, row in train_rows for name in row})
    assert [line.split(",", 1)[1] for line in (output_dir / "class_mapping.csv").read_text().splitlines()[1:]] == labels
    with open(output_dir / "label_stats.csv", encoding="utf-8") as f:
        stats = list(csv.DictReader(f))
    assert [row["label"] for row in stats] == labels
    total = sum(len(row) for _, row in train_rows)
    for row in stats:
        weights = [w / max(r.values()) for _, r in train_rows for name, w in r.items() if name == row["label"]]
        assert int(row["positives"]) == len(weights)
        assert float(row["share"]) == pytest.approx(len(weights) / total, rel=1e-5)
        assert float(row["mean_weight"]) == pytest.approx(np.mean(weights), rel=1e-5)
        assert float(row["pos_weight"]) == pytest.approx((len(train_rows) - len(weights)) / len(weights), rel=1e-5)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["multi_label"] and config["threshold"] == THRESHOLD and config["num_classes"] == len(labels)

    log = read_log(output_dir)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    metrics = {"map_macro", "map_micro", "f1_macro", "f1_micro", "precision_macro", "precision_micro", "recall_macro",
               "recall_micro", "labels_without_positives", "loss"}
    assert {f"{prefix}{key}" for prefix in ("val_", "ema_val_") for key in metrics} <= log[0].keys()
    assert re.search(r"Epoch 3/3: .*, val loss [\d.]+ map_macro [\d.]+ ", result.stdout)
    assert len(list((output_dir / "tensorboard").iterdir())) == 1

    # Label-frequency baseline: a constant score per label ranks nothing, so its AP is the label's positive rate.
    _, present = val_presence(mixed_data)
    baseline = float(np.mean([average_precision_score(present[:, c], np.full(len(present), 0.5))
                              for c in range(present.shape[1]) if present[:, c].any()]))
    best = load_checkpoint_file(output_dir / "model_best.pth")
    assert best["best_key"] == "map_macro"
    assert best["best_metric"] == max(max(r["val_map_macro"], r["ema_val_map_macro"]) for r in log)
    print(f"macro mAP {best['best_metric']:.3f} vs label-frequency baseline {baseline:.3f}")
    assert best["best_metric"] > baseline + 0.15


@pytest.mark.slow
def test_logged_metrics_agree_with_sklearn_on_the_model_predictions(trained, mixed_data):
    output_dir, _ = trained
    best = load_checkpoint_file(output_dir / "model_best.pth")
    net = timm.create_model("lsnet_t_artist", num_classes=6, feature_dim=32).eval()
    load_checkpoint(output_dir / "model_best.pth", net)
    val, present = val_presence(mixed_data)
    with torch.no_grad():
        logits = torch.cat([net(torch.stack([val[i][0] for i in range(start, min(start + 24, len(val)))]))
                            for start in range(0, len(val), 24)])
    scores = logits.sigmoid().numpy()
    metric = MultiLabelMetrics(threshold=THRESHOLD)
    metric.update(logits, torch.from_numpy(present).float())
    assert_matches_sklearn(metric.compute(), scores, present)

    record = read_log(output_dir)[best["epoch"]]  # 0-based, as in DeiT
    prefix = "val_" if best["best_source"] == "model" else "ema_val_"
    logged = {key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix)}
    assert_matches_sklearn(logged, scores, present, tolerance=1e-4)


@pytest.mark.slow
def test_eval_reproduces_the_logged_metrics(trained, mixed_data):
    output_dir, _ = trained
    last = read_log(output_dir)[-1]
    result = run_script(*mixed_data, "--eval", "--resume", str(output_dir / "checkpoint.pth"), "--batch-size", "16",
                        "--threshold", str(THRESHOLD))
    assert result.returncode == 0, result.stderr
    printed = printed_eval(result.stdout)
    for source, prefix in (("model", "val_"), ("model_ema", "ema_val_")):
        for key, value in printed[source].items():
            assert value == pytest.approx(last[prefix + key], rel=1e-6), (source, key)

    # A model folder evaluates model_best.pth, which reproduces the best macro mAP.
    results = run_main(*mixed_data, "--eval", "--resume", str(output_dir), "--batch-size", "16")
    best = load_checkpoint_file(output_dir / "model_best.pth")
    assert results["model"]["map_macro"] == pytest.approx(best["best_metric"], rel=1e-9)


@pytest.mark.slow
def test_resume_gives_the_same_weights(small_data, tmp_path):
    common = [*small_data, "--batch-size", "8", "--accumulation-steps", "2", "--drop-path", "0.1", "--lr", "0.5",
              "--mixup", "0.8"]
    _, straight, resumed = train_straight_and_resumed(run_main, common, tmp_path)
    assert straight["epoch"] == resumed["epoch"] == 1
    for key in ("model", "model_ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name}"
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_log(tmp_path / "straight")]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in read_log(tmp_path / "resumed")]


@pytest.mark.slow
def test_torchrun_two_processes_gather_the_validation(small_data, tmp_path):
    output_dir = tmp_path / "ddp"
    common = [*small_data, "--batch-size", "4", "--lr", "1.0"]
    result = run_script(*common, "--output-dir", str(output_dir), "--epochs", "1", "--dist-eval", "--no-model-ema",
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "distributed: 2 processes, backend gloo" in result.stdout
    assert result.stdout.count("Epoch 1/1:") == 1
    assert len(load_checkpoint_file(output_dir / "checkpoint.pth")["rng_states"]) == 2
    # The 8 validation images were split over the processes; one process over all of them gives the same metrics.
    logged = read_log(output_dir)[0]
    results = run_main(*common, "--eval", "--resume", str(output_dir / "checkpoint.pth"))
    for key, value in results["model"].items():
        assert value == pytest.approx(logged[f"val_{key}"], rel=1e-6), key


@pytest.mark.slow
def test_csv_tools_feed_training_and_prediction(small_data, tmp_path, capsys):
    """generate -> split -> train (from a single-label checkpoint) -> predict."""
    data_path = Path(small_data[1])
    images = tmp_path / "images"
    for image_path, labels in read_multilabel_csv(data_path / "mixed_labels.csv"):
        target = images / image_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((data_path / image_path).read_bytes())
        target.with_suffix(".txt").write_text(", ".join(f"({n}:{w})" for n, w in labels.items()), encoding="utf-8")
    generate_multilabel_csv.main(["--input-dir", str(images), "--output-csv", str(tmp_path / "all.csv"), "--recursive",
                                  "--relative-paths"])
    assert len(read_multilabel_csv(tmp_path / "all.csv")) == 40
    split_multilabel_dataset.main(["--input-dir", str(images), "--train-csv", str(tmp_path / "train.csv"),
                                   "--val-csv", str(tmp_path / "val.csv"), "--val-ratio", "0.25", "--recursive",
                                   "--relative-paths", "--min-label-count", "2"])

    single_label = timm.create_model("lsnet_t_artist", num_classes=7, feature_dim=32)
    torch.save({"model": single_label.state_dict()}, tmp_path / "single.pth")
    output_dir = tmp_path / "run"
    run_main("--data-path", str(images), "--train-ann", str(tmp_path / "train.csv"), "--val-ann",
             str(tmp_path / "val.csv"), "--output-dir", str(output_dir), "--epochs", "1", "--batch-size", "8",
             "--finetune-from", str(tmp_path / "single.pth"))
    assert "head has 7 classes, model has 4: the classifier heads are re-initialised" in capsys.readouterr().out

    record = predict_artist_multilabel.main(predict_artist_multilabel.get_args_parser().parse_args([
        "--checkpoint", str(output_dir), "--inputs", str(images), "--output", str(tmp_path / "preds.json"),
        "--normalize-ratio", "--device", "cpu", "--num-workers", "0"]))
    assert record["num_images"] == 40 and record["skipped"] == []
    labels = set(json.loads((tmp_path / "preds.json").read_text(encoding="utf-8"))["results"][
        f"{images.as_posix()}/mixed/0000.jpg"]["labels"][0])
    assert labels == {"label", "confidence", "ratio"}


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--data-path", ""], r"--data-path is required: the folder the image paths of the CSVs start from"),
    (["--threshold", "1.5"], r"--threshold must be in \(0, 1\), got 1.5"),
    (["--max-pos-weight", "0.5"], r"--max-pos-weight must be at least 1"),
    (["--num-classes", "9"], r"--num-classes 9 but .* has 4 classes"),
    (["--eval"], r"--eval needs --resume PATH"),
    (["--val-ann", "{tmp}/missing.csv"], r"annotation file .*missing.csv not found"),
    (["--resume", "{tmp}/other"], r"the classes of .*checkpoint.pth differ from the dataset's"),
])
def test_clear_errors(argv, message, small_data, tmp_path):
    if "{tmp}/other" in argv:
        other = tmp_path / "other"
        other.mkdir()
        net = timm.create_model("lsnet_t_artist", num_classes=4, feature_dim=32)
        torch.save({"model": net.state_dict(), "optimizer": {}, "epoch": 0, "class_names": list("abcd")},
                   other / "checkpoint.pth")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(UserError, match=message):
        run_main(*small_data, "--output-dir", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "4", *argv)
