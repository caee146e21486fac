"""Retrieval metrics through k-NN search (equal to the dense ranking), auto-k that scales, truthful empty clusters."""

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import analysis.clustering as clustering
import retrieval.metrics as metrics
from analysis.clustering import cluster_features, write_cluster_outputs
from retrieval.metrics import retrieval_metrics
from tools import evaluate_retrieval
from utils import UserError

KS = (1, 5, 10)


def clustered(count: int, artists: int, dim: int = 24, noise: float = 2.0, seed: int = 0):
    """Unit vectors around random artist centres (no two similarities tie) and their artist labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((artists, dim))
    labels = rng.integers(0, artists, count)
    x = centres[labels] / np.sqrt(dim) * 3 + rng.standard_normal((count, dim)) * noise / np.sqrt(dim)
    return x.astype(np.float32), labels


def dense_reference(features, labels, ks=KS, depth=None):
    """The former implementation, written plainly: rank every other image of each query by cosine (stable), then
    Recall@k, AP over the top R and the first relevant rank. ``depth`` cuts the ranking (MRR@depth, misses past it)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    labels = np.asarray(labels)
    per_query = {f"recall@{k}": [] for k in ks} | {"map@r": [], "mrr": []}
    for q in range(len(x)):
        relevant = int((labels == labels[q]).sum()) - 1
        if relevant == 0:
            continue
        sims = x[q] @ x.T
        sims[q] = -np.inf
        hits = labels[np.argsort(-sims, kind="stable")[:-1]] == labels[q]
        if depth is not None:
            hits = hits[:depth]
        for k in ks:
            per_query[f"recall@{k}"].append(hits[:k].any())
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        per_query["map@r"].append((precision * hits)[:relevant].sum() / relevant)
        per_query["mrr"].append(1 / (np.argmax(hits) + 1) if hits.any() else 0.0)
    return {key: float(np.mean(values)) for key, values in per_query.items()}


def assert_same_metrics(result, reference):
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize(("count", "artists", "query_chunk"), [(90, 9, 65_536), (400, 12, 7)])
def test_knn_metrics_equal_the_dense_ranking(count, artists, query_chunk):
    x, labels = clustered(count, artists)
    names = np.array([f"artist {i}" for i in labels])
    names[0] = "alone"  # an artist with one image: unanswerable
    result = retrieval_metrics(x, names, query_chunk=query_chunk)
    assert result["search"]["type"] == "exact" and result["first_hit_beyond_depth"] == 0
    assert result["num_unanswerable"] == 1 and result["num_queries"] == count - 1
    assert result["search_depth"]["min"] == min(count - 1, metrics.MIN_DEPTH)
    assert_same_metrics(result, dense_reference(x, names))
    assert 0.2 < result["map@r"] < 0.98  # neither trivial nor hopeless


def test_max_depth_makes_mrr_and_map_cut_at_the_depth():
    x, labels = clustered(300, 6, noise=30.0)  # about 50 images per artist, hardly separated
    result = retrieval_metrics(x, labels, max_depth=10)
    assert_same_metrics(result, dense_reference(x, labels, depth=10))
    assert result["search_depth"] == {"min": 10, "max": 10, "cap": 10}
    assert result["map_truncated"] == 300  # every artist has more than 10 other images
    assert result["first_hit_beyond_depth"] > 0
    with pytest.raises(UserError, match="--max-depth 5 is below the largest k"):
        retrieval_metrics(x, labels, max_depth=5)


def test_inverted_lists_scanning_every_cell_are_exact_and_fewer_cells_report_agreement(monkeypatch):
    x, labels = clustered(400, 10)
    reference = dense_reference(x, labels)
    monkeypatch.setattr(metrics, "MIN_NPROBE", 10_000)  # every query scans every cell
    every_cell = retrieval_metrics(x, labels, exact_limit=100)
    assert every_cell["search"]["nprobe"] == every_cell["search"]["nlist"] == 20
    assert_same_metrics(every_cell, reference)
    monkeypatch.setattr(metrics, "MIN_NPROBE", 2)
    approximate = retrieval_metrics(x, labels, exact_limit=100)
    search = approximate["search"]
    assert search["type"] == "inverted_lists" and search["nprobe"] == 2
    agreement = search["agreement"]
    assert agreement["sample_queries"] == 400  # fewer queries than the sample: all of them
    assert_same_metrics(agreement["exact"], reference)
    assert agreement["approximate"] == {key: pytest.approx(approximate[key]) for key in agreement["approximate"]}
    assert 0.3 < agreement["neighbour_recall"] < 1.0


def test_memory_check_names_the_need_and_the_options():
    x, labels = clustered(200, 4)
    with pytest.raises(UserError) as error:
        retrieval_metrics(x, labels, memory_limit=2**20, query_chunk=1000)
    message = str(error.value)
    assert "\n" not in message and message.startswith("retrieval over 200 vectors needs about")
    assert "200 queries x 101 results held at once as int64 ids + float32 scores: 1 MiB" in message
    assert "but 1 MiB is available" in message
    assert message.endswith("lower --query-chunk (now 1,000) or --max-depth")


def test_evaluate_retrieval_tool_reports_the_search(tmp_path):
    x, labels = clustered(120, 6)
    np.save(tmp_path / "features.npy", x)
    (tmp_path / "image_names.txt").write_text("".join(f"a{label}/{i}.jpg\n" for i, label in enumerate(labels)))
    args = evaluate_retrieval.get_args_parser().parse_args(
        ["--features", str(tmp_path / "features.npy"), "--names", str(tmp_path / "image_names.txt"),
         "--output", str(tmp_path / "m.json"), "--max-depth", "50"])
    report = evaluate_retrieval.main(args)["retrieval"]
    assert json.loads((tmp_path / "m.json").read_text())["retrieval"] == report
    assert report["search"] == {"type": "exact", "exact_limit": metrics.EXACT_LIMIT}
    assert_same_metrics(report, dense_reference(x, labels, depth=50))


def blobs(count: int, per_blob: int, dim: int = 32, spread: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(count), per_blob)
    x = rng.standard_normal((count, dim))[truth] + rng.standard_normal((len(truth), dim)) * spread / np.sqrt(dim)
    return x.astype(np.float32), truth


def test_auto_k_scales_with_the_data_beyond_ten():
    x, truth = blobs(30, 40)
    result = cluster_features(x, "auto", seed=0)
    assert result.k_range == (2, 60) and result.auto_bound == "one cluster per 20 vectors, at least 10"
    assert result.num_clusters == 30 and adjusted_rand_score(truth, result.labels) == 1.0
    assert 12 < len(result.auto_scores) < 30  # 12 spaced candidates, then refined around the best, not every k
    assert clustering.auto_reason(result).startswith("k=30 has the best silhouette score")
    capped = cluster_features(x, "auto", seed=0, max_clusters=20)
    assert capped.k_range == (2, 20) and capped.num_clusters <= 20 and capped.auto_bound == "max_clusters"


def test_fewer_distinct_vectors_than_clusters_is_the_stated_reason(monkeypatch):
    x = np.repeat(np.eye(5, 8, dtype=np.float32), 20, axis=0)
    for threshold in (50_000, 50):  # KMeans and MiniBatchKMeans
        monkeypatch.setattr(clustering, "MINIBATCH_THRESHOLD", threshold)
        with pytest.raises(UserError, match=r"features hold fewer than 8 distinct vectors \(5\); ask for at most 5"):
            cluster_features(x, 8, seed=0)


def test_clusters_minibatch_left_empty_are_reseeded(monkeypatch, tmp_path):
    monkeypatch.setattr(clustering, "MINIBATCH_THRESHOLD", 50)
    monkeypatch.setattr(clustering, "MINIBATCH_SIZE", 64)
    x, _ = blobs(100, 10, dim=16, spread=0.2)  # 1000 distinct vectors, more clusters asked for than blobs
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    model, _ = clustering._model(len(x), 150, 0, clustering.MINIBATCH_THRESHOLD, n_init=3)
    left_empty = 150 - len(np.unique(model.fit(unit).predict(unit)))
    assert left_empty > 0  # the case of the issue: MiniBatchKMeans alone leaves clusters empty
    result = cluster_features(x, 150, seed=0)
    assert result.reseeded == left_empty and len(np.unique(result.labels)) == 150
    names = [f"a/{i}.png" for i in range(len(x))]
    report = json.loads(write_cluster_outputs(tmp_path, x, names, result)["assignments"].read_text())
    assert report["empty_clusters_reseeded"] == left_empty and min(c["size"] for c in report["clusters"]) >= 1
