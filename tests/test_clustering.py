"""Tests for analysis/clustering.py: k-means recovers clear blobs, auto-k, errors, and the written outputs."""

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from analysis.clustering import (
    cluster_features,
    write_cluster_outputs,
)
from artifacts.outputs import load_features
from utils import UserError


def _blobs(k: int, per_cluster: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Well separated Gaussian blobs around random unit directions, with random lengths (scale must not matter)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), per_cluster)
    x = centres[truth] + rng.normal(scale=spread, size=(len(truth), dim))
    return (x * rng.uniform(0.5, 20, (len(truth), 1))).astype(np.float32), truth


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_well_separated_blobs_are_recovered(l2_normalize):
    x, truth = _blobs(4, 25, spread=0.02)
    if not l2_normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)  # unnormalised k-means needs same-length vectors
    result = cluster_features(x, 4, seed=0, l2_normalize=l2_normalize)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.num_clusters == 4 and result.algorithm == "kmeans" and result.auto_scores is None
    assert result.silhouette > 0.8
    assert result.centroids.shape == (4, 16) and result.distances.shape == (100,)
    assert result.distances.max() < 0.2


def test_l2_normalize_makes_clusters_follow_direction_not_length():
    x, truth = _blobs(3, 20)
    assert adjusted_rand_score(truth, cluster_features(x, 3, seed=0).labels) == 1.0
    assert adjusted_rand_score(truth, cluster_features(x, 3, seed=0, l2_normalize=False).labels) < 0.9


@pytest.mark.parametrize("true_k", [3, 5])
def test_auto_picks_the_true_number_of_clusters(true_k):
    x, truth = _blobs(true_k, 20, seed=true_k)
    result = cluster_features(x, "auto", seed=0, k_range=(2, 8))
    assert result.num_clusters == true_k
    assert sorted(result.auto_scores) == list(range(2, 9)) and result.k_range == (2, 8)
    assert max(result.auto_scores, key=result.auto_scores.get) == true_k
    # the chosen k is refitted on all vectors: the same partition, so the same silhouette
    assert result.silhouette == pytest.approx(result.auto_scores[true_k], abs=1e-5)
    assert adjusted_rand_score(truth, result.labels) == 1.0


def test_auto_caps_the_range_at_n_minus_one_and_samples_the_silhouette():
    x, _ = _blobs(2, 3)
    result = cluster_features(x, "auto", seed=0, sample_size=4)
    assert result.k_range == (2, 5) and sorted(result.auto_scores) == [2, 3, 4, 5]


def test_same_seed_same_result():
    x, _ = _blobs(3, 30, spread=0.5)
    a, b = cluster_features(x, 5, seed=1), cluster_features(x, 5, seed=1)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


@pytest.mark.parametrize("features, k, message", [
    (np.ones((5, 4)), 6, "asked for 6 clusters but there are only 5 vectors"),
    (np.ones((5, 4)), 0, "at least 1"),
    (np.ones((5, 4)), "three", "whole number or 'auto'"),
    (np.ones((2, 4)), "auto", "at least 3 vectors"),
    (np.ones((5, 4)), 2, "fewer than 2 distinct vectors"),
    (np.ones((5, 4)), "auto", "all identical"),
    (np.vstack([np.ones((4, 4)), np.zeros((1, 4))]), 2, "vector 4 is all zeros"),
    (np.full((3, 4), np.nan), 2, "NaN"),
    (np.ones(4), 1, "N x D matrix"),
])
def test_bad_requests_are_user_errors(features, k, message):
    with pytest.raises(UserError, match=message):
        cluster_features(features, k, seed=0)


def test_single_cluster_has_no_silhouette():
    x, _ = _blobs(2, 5)
    result = cluster_features(x, 1, seed=0)
    assert result.silhouette is None and set(result.labels) == {0}


def test_write_outputs_are_consistent(tmp_path):
    x, _ = _blobs(3, 10)
    names = [f"画家 {i // 10}/img_{i:02d}.jpg" for i in range(len(x))]
    result = cluster_features(x, "auto", seed=0, k_range=(2, 5))
    paths = write_cluster_outputs(tmp_path / "out", x, names, result)

    features, loaded_names = load_features(paths["features"], paths["names"])
    assert features.dtype == np.float32 and loaded_names == names
    np.testing.assert_array_equal(features, x)

    report = json.loads(paths["assignments"].read_text(encoding="utf-8"))
    assert report["num_images"] == 30 and report["num_clusters"] == 3 and report["l2_normalize"] is True
    assert report["silhouette"] == pytest.approx(result.silhouette, abs=1e-6)
    assert report["auto_k"]["chosen"] == 3 and report["auto_k"]["k_range"] == [2, 5]
    assert set(report["auto_k"]["silhouette_scores"]) == {"2", "3", "4", "5"}
    assert [c["id"] for c in report["clusters"]] == [0, 1, 2]
    assert sorted(f for c in report["clusters"] for f in c["files"]) == sorted(names)
    images = report["images"]
    assert [im["name"] for im in images] == names
    for cluster in report["clusters"]:
        assert cluster["size"] == len(cluster["files"]) == 10
        assert len(cluster["centroid"]) == 16
        members = [im for im in images if im["cluster"] == cluster["id"]]
        assert {im["name"] for im in members} == set(cluster["files"])
        distances = [next(im["distance"] for im in members if im["name"] == f) for f in cluster["files"]]
        assert distances == sorted(distances)  # nearest to the centroid first
        # Distances are to the centroid in the clustered (unit-length) space.
        unit = x[[names.index(f) for f in cluster["files"]]]
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(unit - cluster["centroid"], axis=1), distances, atol=1e-5)


def test_write_outputs_rejects_names_with_line_breaks(tmp_path):
    x, _ = _blobs(2, 2)
    result = cluster_features(x, 2, seed=0)
    with pytest.raises(UserError, match="line break"):
        write_cluster_outputs(tmp_path, x, ["a", "b\nc", "d", "e"], result)


def test_minibatch_above_threshold(monkeypatch):
    import analysis.clustering as clustering

    monkeypatch.setattr(clustering, "MINIBATCH_THRESHOLD", 50)
    x, truth = _blobs(3, 30)
    result = cluster_features(x, 3, seed=0)
    assert result.algorithm == "minibatch_kmeans" and adjusted_rand_score(truth, result.labels) == 1.0
