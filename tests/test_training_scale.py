"""Training at community scale (issue 23): the report counts sparsely (memory linear in images + classes), the
multi-label metrics sort one label column at a time, and sizes that cannot fit stop with one line."""

from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix
from test_multilabel_train import make_mixed_set, run_main
from torch import nn
from torch.utils.data import TensorDataset

import training.metrics
from artifacts.checkpoint import save_checkpoint_atomic
from artifacts.model_source import BEST_FILE
from training.metrics import MultiLabelMetrics
from training.report import REPORT_FILE, Predictions, most_confused, per_class_accuracy, write_report, write_run_report
from utils import UserError

RECORDS = [{"epoch": 1, "lr": 1e-3, "train_loss": 2.0, "val_loss": 2.1, "val_map_macro": 0.5, "val_acc1": 40.0}]


def random_predictions(images: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, Predictions]:
    """Probabilities with many exact ties (values in quarters) and their targets; the last class has no image."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (images, classes)).astype(np.float32) / 4
    targets = rng.integers(0, classes - 1, images)
    return scores, targets, Predictions.from_scores(scores, targets)


def dense_pairs(targets: np.ndarray, predicted: np.ndarray, classes: int) -> list[tuple[int, int, int]]:
    """The confused pairs read off the dense confusion matrix: images descending, then true id, predicted id."""
    matrix = confusion_matrix(targets, predicted, labels=list(range(classes)))
    np.fill_diagonal(matrix, 0)
    true, guess = np.nonzero(matrix)
    return sorted(((int(t), int(p), int(matrix[t, p])) for t, p in zip(true, guess, strict=True)),
                  key=lambda pair: (-pair[2], pair[0], pair[1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_counts_equal_the_dense_confusion_matrix(seed):
    classes = 9
    scores, targets, preds = random_predictions(400, classes, seed)
    predicted = scores.argmax(axis=1)  # ties: the lowest class id, like the report
    assert np.array_equal(preds.predicted, predicted) and np.array_equal(preds.targets, targets)
    assert np.array_equal(preds.true_score, scores[np.arange(400), targets])
    matrix = confusion_matrix(targets, predicted, labels=list(range(classes)))
    with np.errstate(invalid="ignore"):
        expected = np.diag(matrix) / matrix.sum(axis=1)
    np.testing.assert_array_equal(per_class_accuracy(preds, classes), expected)  # NaN for the class without images
    every = dense_pairs(targets, predicted, classes)
    assert len(every) > 40 and len({count for _, _, count in every}) < len(every)  # ties to order
    assert most_confused(preds, classes, limit=len(every) + 5) == every
    assert most_confused(preds, classes) == every[:20]


def test_report_at_100000_classes_counts_pairs_sparsely(tmp_path):
    """Class ids near 100,000 make pair codes past 2**31; a dense matrix would need 74.5 GiB."""
    classes = 100_000
    rng = np.random.default_rng(3)
    targets = classes - 1 - rng.integers(0, 30, 600)
    predicted = np.where(rng.random(600) < 0.5, targets, classes - 1 - rng.integers(0, 30, 600))
    score = rng.random(600).astype(np.float32)
    preds = Predictions(targets, predicted, score, score * 0.5)
    wrong = Counter((int(t), int(p)) for t, p in zip(targets, predicted, strict=True) if t != p)
    expected = sorted(((t, p, n) for (t, p), n in wrong.items()), key=lambda pair: (-pair[2], pair[0], pair[1]))
    assert most_confused(preds, classes) == expected[:20]
    names = [f"artist_{i}" for i in range(classes)]
    write_report(tmp_path, RECORDS, names, preds, "acc1", "best acc1: epoch 1")
    page = _Text()
    page.feed((tmp_path / REPORT_FILE).read_text(encoding="utf-8"))
    true, guess, count = expected[0]
    assert f"artist_{true} artist_{guess} {count}" in " ".join(" ".join(page.text).split())
    assert not (tmp_path / "report_confusion.png").exists() and (tmp_path / "report_per_class.png").is_file()


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text = []

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.parametrize("sorted_at_once", [None, 7])
def test_multilabel_metrics_equal_sklearn_per_label(sorted_at_once, monkeypatch):
    """Per-label AP (one sort per label column, blocks of columns) and micro AP (sorted pieces) equal scikit-learn,
    ties included; 7 values at once forces one-column blocks and a piece per batch."""
    if sorted_at_once:
        monkeypatch.setattr(training.metrics, "SORTED_AT_ONCE", sorted_at_once)
    rng = np.random.default_rng(5)
    scores = (rng.integers(1, 12, (90, 25)) / 12).astype(np.float32)  # many tied confidences per label
    present = rng.random((90, 25)) < 0.15
    present[:, 4] = False
    present[3, 7] = True  # a rare label
    logits = torch.logit(torch.from_numpy(scores).double()).float()
    metric = MultiLabelMetrics(threshold=0.4)
    for rows in (slice(0, 32), slice(32, 64), slice(64, 90)):
        metric.update(logits[rows], torch.from_numpy(present[rows]).float() * 0.7)
    result = metric.compute()
    sigmoid = logits.sigmoid().numpy()
    keep = present.any(axis=0)
    per_label = [average_precision_score(present[:, c], sigmoid[:, c]) for c in np.flatnonzero(keep)]
    assert result["map_macro"] == pytest.approx(np.mean(per_label), abs=1e-12)
    assert result["map_micro"] == pytest.approx(average_precision_score(present.ravel(), sigmoid.ravel()), abs=1e-12)
    assert result["labels_without_positives"] == 1
    per_column = training.metrics.average_precision(torch.from_numpy(sigmoid), torch.from_numpy(present)).numpy()
    np.testing.assert_allclose(per_column[keep], per_label, rtol=0, atol=1e-12)
    assert np.isnan(per_column[~keep]).all()


def test_label_memory_is_estimated_before_allocating():
    with pytest.raises(UserError) as err:  # 5 TB of confidences: more than any test machine has
        MultiLabelMetrics.check_memory(1_000_000, 1_000_000)
    message = str(err.value)
    assert "\n" not in message and "1,000,000 images x 1,000,000 labels" in message
    assert "4656.61 GiB" in message and "--val-ann" in message
    MultiLabelMetrics.check_memory(1000, 100)  # 0.5 MB: fine


def test_a_report_that_does_not_fit_is_one_warning_and_the_run_is_kept(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    save_checkpoint_atomic({"model": model.state_dict()}, tmp_path / BEST_FILE)
    saved = (tmp_path / BEST_FILE).read_bytes()
    data = TensorDataset(torch.rand(6, 3, 8, 8), (torch.rand(6, 3) < 0.5).float())
    common = dict(best_key="map_macro", summary="best map_macro: epoch 1", batch_size=4, multi_label=True)
    monkeypatch.setattr(training.metrics, "available_memory", lambda: 64)
    assert write_run_report(tmp_path, model, RECORDS, ["a", "b", "c"], data, torch.device("cpu"), **common) is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("warning: the training report could not be written (the report's "
                                               "average precision of 6 images x 3 labels needs 0.00 GiB")
    assert out[0].endswith("validate on fewer images (a shorter --val-ann CSV)); the run itself is saved")
    assert not (tmp_path / REPORT_FILE).exists() and (tmp_path / BEST_FILE).read_bytes() == saved
    monkeypatch.undo()
    assert write_run_report(tmp_path, model, RECORDS, ["a", "b", "c"], data, torch.device("cpu"), **common)
    assert (tmp_path / "report_per_class.png").is_file()


def test_multilabel_training_checks_the_validation_memory_before_it_starts(tmp_path, monkeypatch):
    data = make_mixed_set(tmp_path / "mixed", num_artists=3, num_mixed=10, num_val=4)
    monkeypatch.setattr(training.metrics, "available_memory", lambda: 32)  # 4 x 3 x 5 bytes do not fit
    with pytest.raises(UserError, match=r"^multi-label validation of 4 images x 3 labels \(5 bytes each\) needs "
                                        r"0\.00 GiB of memory, 0\.00 GiB are available; validate on fewer images"):
        run_main(*data, "--output-dir", str(tmp_path / "run"), "--epochs", "1")
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
