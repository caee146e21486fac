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
DEFAULT_K_RANGE = (2, 10)  # candidates for num_clusters="auto", inclusive
SILHOUETTE_SAMPLE = 10_000  # silhouette on a random sample above this many vectors (it is quadratic in N)


@dataclass
class ClusterResult:
    """Outcome of :func:`cluster_features`; centroids and distances are in the clustered (normalised) space."""

    labels: np.ndarray  # (N,) cluster id of each vector
    centroids: np.ndarray  # (k, D) cluster means
    distances: np.ndarray  # (N,) Euclidean distance of each vector to its cluster's centroid
    num_clusters: int
    silhouette: float | None  # None where undefined (one cluster, or one vector per cluster)
    auto_scores: dict[int, float] | None  # silhouette of each candidate k when num_clusters was "auto"
    k_range: tuple[int, int] | None  # the candidate range searched by "auto"
    algorithm: str  # "kmeans" or "minibatch_kmeans"
    l2_normalize: bool
    seed: int


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError(f"vector {int(np.argmax(norms == 0))} is all zeros and cannot be L2-normalised; "
                        "drop it or cluster with --no-l2-normalize")
    return x / norms


def _fit(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """K-means labels and centroids; raises UserError when fewer than ``k`` distinct clusters exist."""
    if len(x) > MINIBATCH_THRESHOLD:
        model, name = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3), "minibatch_kmeans"
    else:
        model, name = KMeans(n_clusters=k, random_state=seed, n_init=4), "kmeans"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: checked below
        labels = model.fit_predict(x)
    found = len(np.unique(labels))
    if found < k:
        raise UserError(f"only {found} of {k} clusters are non-empty because the features hold fewer than {k} "
                        "distinct vectors; ask for fewer clusters")
    return labels, model.cluster_centers_.astype(np.float32), name


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int, sample_size: int) -> float | None:
    if not 2 <= len(np.unique(labels)) <= len(x) - 1:
        return None
    sample = sample_size if len(x) > sample_size else None
    return float(silhouette_score(x, labels, sample_size=sample, random_state=seed))


def _auto_k(
    x: np.ndarray, k_range: tuple[int, int], seed: int, sample_size: int
) -> tuple[tuple[int, np.ndarray, np.ndarray, str], dict[int, float], tuple[int, int]]:
    """Fit every k of ``k_range`` (capped at N - 1) and keep the best silhouette (the smaller k on ties).

    Returns the best ``(k, labels, centroids, algorithm)``, the silhouette of every k tried and the range searched.
    """
    lo, hi = k_range
    if lo < 2 or hi < lo:
        raise ValueError(f"k_range {k_range} must satisfy 2 <= low <= high")
    n = len(x)
    if n < 3:
        raise UserError(f"automatic k needs at least 3 vectors, got {n}; pass a number of clusters")
    searched = (lo, min(hi, n - 1))
    if searched[0] > searched[1]:
        raise UserError(f"automatic k searches {lo}..{hi} clusters but there are only {n} vectors; "
                        "pass a number of clusters")
    scores, best = {}, None
    for k in range(searched[0], searched[1] + 1):
        try:
            labels, centroids, algorithm = _fit(x, k, seed)
        except UserError:
            break  # not enough distinct vectors for k (or more) clusters
        scores[k] = _silhouette(x, labels, seed, sample_size)
        if best is None or scores[k] > scores[best[0]]:
            best = (k, labels, centroids, algorithm)
    if best is None:
        raise UserError("the vectors are (nearly) all identical, so they do not form clusters; check the features")
    return best, scores, searched


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
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    sample_size: int = SILHOUETTE_SAMPLE,
) -> ClusterResult:
    """Cluster N x D features with k-means (MiniBatchKMeans above 50,000 vectors).

    ``num_clusters="auto"`` tries every k in ``k_range`` (inclusive, capped at N - 1) and keeps the one with the
    best silhouette score (the smaller k on ties); the silhouette is computed on ``sample_size`` random vectors
    when there are more. With ``l2_normalize`` the vectors are scaled to unit length first, so clusters follow
    the direction of the features (as cosine similarity does), not their length.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        raise UserError(f"features have shape {x.shape}; expected a non-empty N x D matrix")
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or infinite values; re-extract them")
    if l2_normalize:
        x = _l2_normalize(x)
    scores = searched = None
    if num_clusters == "auto":
        (k, labels, centroids, algorithm), scores, searched = _auto_k(x, k_range, seed, sample_size)
        silhouette = scores[k]
    else:
        k = _check_num_clusters(num_clusters, len(x))
        labels, centroids, algorithm = _fit(x, k, seed)
        silhouette = _silhouette(x, labels, seed, sample_size)
    return ClusterResult(
        labels=labels.astype(np.int64),
        centroids=centroids,
        distances=np.linalg.norm(x - centroids[labels], axis=1).astype(np.float32),
        num_clusters=int(k),
        silhouette=silhouette,
        auto_scores=scores,
        k_range=searched,
        algorithm=algorithm,
        l2_normalize=l2_normalize,
        seed=seed,
    )


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
    for c in range(result.num_clusters):
        members = np.flatnonzero(result.labels == c)
        members = members[np.argsort(result.distances[members], kind="stable")]
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
        "auto_k": None if result.auto_scores is None else {
            "k_range": list(result.k_range),
            "silhouette_scores": {str(k): _round(s) for k, s in result.auto_scores.items()},
            "chosen": result.num_clusters,
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
