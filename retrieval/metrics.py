"""Retrieval and open-set metrics on L2-normalised style vectors (cosine similarity).

Retrieval (leave-one-out: every image queries all others, its own image excluded):

- Recall@k: share of queries with at least one image of the same artist among the k most similar.
- mAP@R: mean over queries of the average precision over the top R results, R = the number of other images of
  the query's artist (Musgrave et al., "A Metric Learning Reality Check", 2020).
- MRR: mean reciprocal rank of the first image of the same artist.

Queries whose artist has no other image cannot be answered and are left out (their count is reported).
"""

from typing import Any

import numpy as np

from retrieval.index import l2_normalize

CHUNK = 256  # query rows scored at once (CHUNK x N similarities and ranks in memory)


def _ranked_relevance(features: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For the query ``rows``: same-artist flags of all other images, most similar first (``len(rows) x N-1``)."""
    sims = features[rows] @ features.T
    sims[np.arange(len(rows)), rows] = -np.inf  # the query's own image
    order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
    return labels[order] == labels[rows][:, None]


def retrieval_metrics(features: np.ndarray, labels: list[str] | np.ndarray,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any]:
    """Recall@k, mAP@R and MRR of leave-one-out retrieval over ``features`` (normalised here) labelled ``labels``."""
    features = l2_normalize(features, "feature vector")
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    relevant_count = counts[inverse] - 1
    queries = np.flatnonzero(relevant_count > 0)
    recall = {k: 0.0 for k in ks}
    ap_sum = rr_sum = 0.0
    for start in range(0, len(queries), CHUNK):
        rows = queries[start:start + CHUNK]
        hits = _ranked_relevance(features, labels, rows)
        first = hits.argmax(axis=1)
        rr_sum += float((1.0 / (first + 1)).sum())
        for k in ks:
            recall[k] += float(hits[:, :k].any(axis=1).sum())
        r = relevant_count[rows]
        positions = np.arange(1, hits.shape[1] + 1)
        precision = np.cumsum(hits, axis=1) / positions
        in_top_r = positions[None] <= r[:, None]
        ap_sum += float(((precision * hits * in_top_r).sum(axis=1) / r).sum())
    n = max(len(queries), 1)
    return {"num_images": int(len(labels)), "num_artists": int(len(counts)), "num_queries": int(len(queries)),
            "num_unanswerable": int(len(labels) - len(queries)), "normalized": True, "metric": "cosine",
            **{f"recall@{k}": recall[k] / n for k in ks}, "map@r": ap_sum / n, "mrr": rr_sum / n}


def identification_metrics(predicted: list[list[str]], truth: list[str], enrolled: set[str],
                           unknown: np.ndarray | None) -> dict[str, Any]:
    """Closed- and open-set identification: ``predicted[i]`` are query ``i``'s artists best first, ``truth[i]`` its
    real artist, ``unknown[i]`` whether it was marked unknown (None: no threshold).

    top-1/top-5 count queries of enrolled artists; ``false_unknown_rate`` is the share of those marked unknown and
    ``unknown_detection_rate`` the share of queries of artists outside the gallery marked unknown.
    """
    known = np.array([t in enrolled for t in truth], bool)
    result: dict[str, Any] = {"num_known_queries": int(known.sum()), "num_unknown_queries": int((~known).sum()),
                              "num_gallery_artists": len(enrolled), "chance_top1": 1.0 / max(len(enrolled), 1)}
    for k in (1, 5):
        hits = [truth[i] in predicted[i][:k] for i in np.flatnonzero(known)]
        result[f"top{k}"] = float(np.mean(hits)) if hits else None
    if unknown is not None:
        result["false_unknown_rate"] = float(unknown[known].mean()) if known.any() else None
        result["unknown_detection_rate"] = float(unknown[~known].mean()) if (~known).any() else None
        correct = np.array([not unknown[i] and predicted[i][0] == truth[i] for i in np.flatnonzero(known)], bool)
        result["open_set_top1"] = float(correct.mean()) if known.any() else None
    return result
