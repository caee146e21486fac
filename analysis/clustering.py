"""Cluster style feature vectors and write the results; no model code, so it works on any saved features.

Used by ``tools/extract_cluster_features.py`` to cluster features just extracted, or saved ones given with
``--features`` and ``--names``.
"""

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from utils import UserError

MINIBATCH_THRESHOLD = 50_000  # above this many vectors use MiniBatchKMeans
MINIBATCH_SIZE = 4096  # MiniBatchKMeans batch size
KMEANS_PP_LIMIT = 1000  # MiniBatchKMeans seeds k-means++ up to this many clusters (cost grows with k^2), randomly above
SILHOUETTE_SAMPLE = 10_000  # silhouette on a random sample above this many vectors (it is quadratic in N)
REFINE_ITERATIONS = 10  # Lloyd iterations that re-seed the clusters MiniBatchKMeans left empty
# num_clusters="auto": candidates k from 2 up to one cluster per AUTO_VECTORS_PER_CLUSTER vectors (at least
# AUTO_MIN_HIGH), AUTO_CANDIDATES spaced log-uniformly, then rounds of AUTO_REFINE between the best one's tried
# neighbours until they lie within AUTO_RESOLUTION of it (or are adjacent). Each candidate is fitted on
# FIT_PER_CLUSTER * k sampled vectors (at least FIT_SAMPLE_MIN), with KMeans up to AUTO_FULL_KMEANS of them and
# MiniBatchKMeans above, and scored by the silhouette of one fixed sample.
AUTO_VECTORS_PER_CLUSTER = 20
AUTO_MIN_HIGH = 10
AUTO_CANDIDATES = 12
AUTO_REFINE = 4
AUTO_RESOLUTION = 0.1
AUTO_PATIENCE = 3  # spaced candidates stop after this many in a row score below the best
FIT_PER_CLUSTER = 20
FIT_SAMPLE_MIN = 20_000
AUTO_FULL_KMEANS = 5_000


@dataclass
class ClusterResult:
    """Outcome of :func:`cluster_features`; centroids and distances are in the clustered (normalised) space."""

    labels: np.ndarray  # (N,) cluster id of each vector
    centroids: np.ndarray  # (k, D) cluster means
    distances: np.ndarray  # (N,) Euclidean distance of each vector to its cluster's centroid
    num_clusters: int
    silhouette: float | None  # None where undefined (one cluster, or one vector per cluster)
    auto_scores: dict[int, float | None] | None  # silhouette of each candidate k when num_clusters was "auto"
    k_range: tuple[int, int] | None  # the candidate range searched by "auto"
    algorithm: str  # "kmeans" or "minibatch_kmeans"
    l2_normalize: bool
    seed: int
    auto_bound: str | None = None  # why "auto" searched up to k_range[1]
    reseeded: int = 0  # clusters MiniBatchKMeans left empty, re-seeded by k-means refinement


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError(f"vector {int(np.argmax(norms == 0))} is all zeros and cannot be L2-normalised; "
                        "drop it or cluster with --no-l2-normalize")
    return x / norms


def _model(n: int, k: int, seed: int, full_limit: int, n_init: int) -> tuple[KMeans | MiniBatchKMeans, str]:
    """KMeans for up to ``full_limit`` vectors, MiniBatchKMeans (``n_init`` runs) above."""
    if n <= full_limit:
        return KMeans(n_clusters=k, random_state=seed, n_init=4), "kmeans"
    init = "k-means++" if k <= KMEANS_PP_LIMIT else "random"
    return MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=MINIBATCH_SIZE, n_init=n_init, init=init,
                           compute_labels=False), "minibatch_kmeans"


def _fit_predict(model: KMeans | MiniBatchKMeans, x: np.ndarray, predict: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: checked by the callers
        return model.fit(x).predict(predict)


def _fit(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, str, int]:
    """K-means labels, centroids, algorithm and the number of empty clusters re-seeded.

    Clusters MiniBatchKMeans leaves empty are re-seeded by a few KMeans iterations from its centroids (which move
    empty clusters to the vectors farthest from theirs); a UserError says why when ``k`` clusters cannot be filled.
    """
    model, name = _model(len(x), k, seed, MINIBATCH_THRESHOLD, n_init=3)
    labels = _fit_predict(model, x, x)
    empty = k - len(np.unique(labels))
    if not empty:
        return labels, model.cluster_centers_.astype(np.float32), name, 0
    distinct = len(np.unique(x, axis=0))
    if distinct < k:
        raise UserError(f"only {k - empty} of {k} clusters are non-empty because the features hold fewer than {k} "
                        f"distinct vectors ({distinct}); ask for at most {distinct} clusters")
    refine = KMeans(n_clusters=k, init=model.cluster_centers_, n_init=1, max_iter=REFINE_ITERATIONS,
                    random_state=seed)
    labels = _fit_predict(refine, x, x)
    left = k - len(np.unique(labels))
    if left:
        raise UserError(f"k-means left {left} of {k} clusters empty although the features hold {distinct} distinct "
                        "vectors; ask for fewer clusters or try another --seed")
    return labels, refine.cluster_centers_.astype(np.float32), name, empty


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int, sample_size: int) -> float | None:
    if not 2 <= len(np.unique(labels)) <= len(x) - 1:
        return None
    sample = sample_size if len(x) > sample_size else None
    return float(silhouette_score(x, labels, sample_size=sample, random_state=seed))


def auto_k_range(n: int, max_clusters: int | None = None) -> tuple[tuple[int, int], str]:
    """The range of k that ``num_clusters="auto"`` searches for ``n`` vectors, and why it ends there."""
    if max_clusters is not None:
        return (2, max_clusters), "max_clusters"
    high = max(AUTO_MIN_HIGH, n // AUTO_VECTORS_PER_CLUSTER)
    return (2, high), f"one cluster per {AUTO_VECTORS_PER_CLUSTER} vectors, at least {AUTO_MIN_HIGH}"


def _candidates(low: int, high: int, count: int) -> list[int]:
    """Every k of ``low..high`` if there are at most ``count``, else ``count`` of them spaced log-uniformly."""
    if high - low + 1 <= count:
        return list(range(low, high + 1))
    return sorted({int(k) for k in np.round(np.geomspace(low, high, count))})


def _score_k(x: np.ndarray, order: np.ndarray, k: int, seed: int, sample_size: int) -> float | None:
    """Silhouette of the first ``sample_size`` vectors of ``order`` under ``k`` clusters fitted on a sample."""
    fit = x[order[:max(FIT_SAMPLE_MIN, FIT_PER_CLUSTER * k)]]
    model, _ = _model(len(fit), k, seed, AUTO_FULL_KMEANS, n_init=1)
    scored = x[order[:sample_size]]
    return _silhouette(scored, _fit_predict(model, fit, scored), seed, sample_size)


def _best(scores: dict[int, float | None]) -> int:
    """The k of the best silhouette (the smaller k on ties; undefined scores last)."""
    return max(sorted(scores), key=lambda k: -2.0 if scores[k] is None else scores[k])


def _auto_k(x: np.ndarray, k_range: tuple[int, int], seed: int,
            sample_size: int) -> tuple[int, dict[int, float | None], tuple[int, int]]:
    """Score log-spaced candidates of ``k_range`` (capped at N - 1 and the distinct vectors), then more between the
    best one's neighbours; returns the best k, the score of every k tried and the range searched."""
    lo, hi = k_range
    if lo < 2 or hi < lo:
        raise ValueError(f"k_range {k_range} must satisfy 2 <= low <= high")
    n = len(x)
    if n < 3:
        raise UserError(f"automatic k needs at least 3 vectors, got {n}; pass a number of clusters")
    distinct = len(np.unique(x, axis=0))
    if distinct < 2:
        raise UserError("the vectors are (nearly) all identical, so they do not form clusters; check the features")
    searched = (lo, min(hi, n - 1, distinct))
    if searched[0] > searched[1]:
        raise UserError(f"automatic k searches {lo}..{hi} clusters but there are only {n} vectors; "
                        "pass a number of clusters")
    order = np.random.default_rng(seed).permutation(n)
    first, scores = _candidates(*searched, AUTO_CANDIDATES), {}
    spaced = searched[1] - searched[0] + 1 > AUTO_CANDIDATES
    for position, k in enumerate(first):
        scores[k] = _score_k(x, order, k, seed, sample_size)
        if spaced and position - first.index(_best(scores)) >= AUTO_PATIENCE:
            break  # past the peak: the last candidates all scored below the best
    while True:  # refine between the best k's tried neighbours until they are within AUTO_RESOLUTION of it
        tried, best = sorted(scores), _best(scores)
        i = tried.index(best)
        low, high = tried[max(i - 1, 0)], tried[min(i + 1, len(tried) - 1)]
        wide = high - low > max(2, AUTO_RESOLUTION * best)
        new = [k for k in _candidates(low + 1, high - 1, AUTO_REFINE) if k not in scores] if wide else []
        if not new:
            break
        for k in new:
            scores[k] = _score_k(x, order, k, seed, sample_size)
    return _best(scores), dict(sorted(scores.items())), searched


def _check_num_clusters(k: object, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"number of clusters {k!r} must be a whole number or 'auto'")
    if k < 1:
        raise UserError(f"number of clusters must be at least 1, got {k}")
    if k > n:
        raise UserError(f"asked for {k} clusters but there are only {n} vectors; "
                        f"use at most {n} clusters (or 'auto')")
    return int(k)


def cluster_features(
    features: np.ndarray,
    num_clusters: int | str,
    seed: int = 0,
    l2_normalize: bool = True,
    k_range: tuple[int, int] | None = None,
    sample_size: int = SILHOUETTE_SAMPLE,
    max_clusters: int | None = None,
) -> ClusterResult:
    """Cluster N x D features with k-means (MiniBatchKMeans above 50,000 vectors).

    ``num_clusters="auto"`` scores candidate k by the silhouette of ``sample_size`` random vectors and keeps the
    best (the smaller k on ties): candidates spaced log-uniformly over ``k_range`` (default: 2 up to one cluster
    per 20 vectors, at least 10, or ``max_clusters``; capped at N - 1 and the distinct vectors), then more between
    the best one's neighbours; the chosen k is then fitted on all vectors. With ``l2_normalize`` the vectors are
    scaled to unit length first, so clusters follow the direction of the features (as cosine similarity does),
    not their length.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        raise UserError(f"features have shape {x.shape}; expected a non-empty N x D matrix")
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or infinite values; re-extract them")
    if l2_normalize:
        x = _l2_normalize(x)
    scores = searched = bound = None
    if num_clusters == "auto":
        if k_range is None:
            k_range, bound = auto_k_range(len(x), max_clusters)
        k, scores, searched = _auto_k(x, k_range, seed, sample_size)
    else:
        k = _check_num_clusters(num_clusters, len(x))
    labels, centroids, algorithm, reseeded = _fit(x, k, seed)
    return ClusterResult(
        labels=labels.astype(np.int64),
        centroids=centroids,
        distances=_distances(x, centroids, labels),
        num_clusters=int(k),
        silhouette=_silhouette(x, labels, seed, sample_size),
        auto_scores=scores,
        k_range=searched,
        algorithm=algorithm,
        l2_normalize=l2_normalize,
        seed=seed,
        auto_bound=bound,
        reseeded=reseeded,
    )


def _distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Euclidean distance of each vector to its centroid, a chunk of rows at a time."""
    return np.concatenate([np.linalg.norm(x[s:s + chunk] - centroids[labels[s:s + chunk]], axis=1)
                           for s in range(0, len(x), chunk)]).astype(np.float32)


def auto_reason(result: ClusterResult) -> str:
    """Why "auto" chose its k, in one sentence."""
    lo, hi = result.k_range
    bound = f" (upper bound: {result.auto_bound})" if result.auto_bound else ""
    score = result.auto_scores[result.num_clusters]
    shown = "undefined" if score is None else f"{score:.4f}"
    return (f"k={result.num_clusters} has the best silhouette score ({shown}) of {len(result.auto_scores)} "
            f"candidates spaced log-uniformly over {lo}..{hi}{bound}")


def _round(value: float) -> float:
    return round(float(value), 6)


def write_cluster_outputs(
    output_dir: str | os.PathLike, features: np.ndarray, names: list[str], result: ClusterResult
) -> dict[str, Path]:
    """Write ``features.npy`` (float32), ``image_names.txt`` and ``cluster_assignments.json``; returns their paths.

    ``features.npy`` holds the input features as given (not normalised), row i named by line i of
    ``image_names.txt``, so the pair can be fed back with ``--features``/``--names``. Each cluster lists its
    files nearest-to-centroid first.
    """
    features = np.asarray(features)
    if not len(features) == len(names) == len(result.labels):
        raise ValueError(f"{len(features)} features, {len(names)} names and {len(result.labels)} labels differ")
    for name in names:
        if not name or "\n" in name or "\r" in name:
            raise UserError(f"image name {name!r} is empty or holds a line break; it cannot go in image_names.txt")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "features": out / "features.npy",
        "names": out / "image_names.txt",
        "assignments": out / "cluster_assignments.json",
    }
    np.save(paths["features"], features.astype(np.float32))
    with open(paths["names"], "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{name}\n" for name in names)
    clusters = []
    by_cluster = np.lexsort((np.arange(len(names)), result.distances, result.labels))  # nearest first
    bounds = np.searchsorted(result.labels[by_cluster], np.arange(result.num_clusters + 1))
    for c in range(result.num_clusters):
        members = by_cluster[bounds[c]:bounds[c + 1]]
        clusters.append({
            "id": c,
            "size": len(members),
            "files": [names[i] for i in members],
            "centroid": [_round(v) for v in result.centroids[c]],
        })
    report = {
        "num_images": len(names),
        "num_clusters": result.num_clusters,
        "algorithm": result.algorithm,
        "l2_normalize": result.l2_normalize,
        "seed": result.seed,
        "silhouette": None if result.silhouette is None else _round(result.silhouette),
        "empty_clusters_reseeded": result.reseeded,
        "auto_k": None if result.auto_scores is None else {
            "k_range": list(result.k_range),
            "range_bound": result.auto_bound,
            "silhouette_scores": {str(k): None if s is None else _round(s) for k, s in result.auto_scores.items()},
            "chosen": result.num_clusters,
            "reason": auto_reason(result),
        },
        "clusters": clusters,
        "images": [
            {"name": name, "cluster": int(c), "distance": _round(d)}
            for name, c, d in zip(names, result.labels, result.distances, strict=True)
        ],
    }
    with open(paths["assignments"], "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    return paths
