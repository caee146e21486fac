"""Retrieval and open-set metrics on L2-normalised style vectors (cosine similarity).

Retrieval (leave-one-out: every image queries all others, its own image excluded):

- Recall@k: share of queries with at least one image of the same artist among the k most similar.
- mAP@R: mean over queries of the average precision over the top R results, R = the number of other images of
  the query's artist (Musgrave et al., "A Metric Learning Reality Check", 2020).
- MRR: mean reciprocal rank of the first image of the same artist.

Queries whose artist has no other image cannot be answered and are left out (their count is reported).

Each query's nearest images come from a k-NN search, never a full ranking: a query is searched
``max(R, largest k, MIN_DEPTH)`` results deep (at most ``max_depth``), queries of similar depth together. Up to
``exact_limit`` vectors the search is exact (blocked matrix products, results kept in Faiss's heaps); above it an
inverted-file search (k-means cells, each query compares itself with the vectors of its ``nprobe`` nearest cells,
cell by cell as matrix products) and its agreement with exact search is measured on a sample of queries. A query
whose first same-artist image lies beyond its searched depth adds 0 to MRR (so MRR is MRR@depth; at most
1 / (depth + 1) lower per such query) and is counted; relevant images beyond a ``max_depth`` cut count as misses
in mAP@R.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from data.scan import available_memory
from retrieval.index import l2_normalize
from utils import UserError

EXACT_LIMIT = 200_000  # up to this many vectors the k-NN search is exact (above: inverted lists)
MIN_DEPTH = 100  # every query is searched at least this deep
QUERY_CHUNK = 65_536  # queries searched together, their results held at once
BLOCK = 4096  # rows and columns of one similarity block; also the rows scored at once
RESULT_BYTES = 12  # one held search result: int64 id + float32 score
SCORING_BYTES = 48  # working memory per result while scoring (ranks, hits, precision)
CELL_POINTS = 40  # k-means training vectors per inverted-list cell
NPROBE_SHARE = 8  # an inverted-file query scans 1/8 of the cells (at least MIN_NPROBE)
MIN_NPROBE = 8
AGREEMENT_SAMPLE = 1000  # queries searched both exactly and through the inverted file to measure agreement

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (query rows, k) -> (scores, ids), best first


@dataclass
class _Cells:
    """An inverted file without copies: vector ids grouped by their nearest k-means centroid."""

    centroids: np.ndarray  # (nlist, D), unit length
    order: np.ndarray  # vector ids sorted by cell; cell c holds order[bounds[c]:bounds[c + 1]]
    bounds: np.ndarray
    nprobe: int  # cells scanned per query


def _flat_knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the ``k`` database rows of largest inner product with each query, best first (id -1
    past the end)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    rows = np.arange(len(queries))
    for start in range(0, len(database), BLOCK):
        block = database[start:start + BLOCK]
        ids = np.arange(start, start + len(block))
        for q in range(0, len(queries), BLOCK):
            heap.add_result_subset(rows[q:q + BLOCK], queries[q:q + BLOCK] @ block.T, ids)
    heap.finalize()
    return heap.D, heap.I


def _cell_counts(count: int) -> tuple[int, int]:
    """Inverted-file cells for ``count`` vectors: about sqrt(count), a share NPROBE_SHARE of them scanned."""
    nlist = max(1, round(math.sqrt(count)))
    return nlist, min(nlist, max(MIN_NPROBE, nlist // NPROBE_SHARE))


def _build_cells(x: np.ndarray, seed: int) -> _Cells:
    """Spherical k-means cells of ``x``, each vector filed under its nearest centroid."""
    nlist, nprobe = _cell_counts(len(x))
    sample = np.random.default_rng(seed).choice(len(x), min(len(x), nlist * CELL_POINTS), replace=False)
    kmeans = faiss.Kmeans(x.shape[1], nlist, niter=20, seed=seed, spherical=True, min_points_per_centroid=1)
    kmeans.train(x[np.sort(sample)])
    cell = np.concatenate([_flat_knn(x[s:s + QUERY_CHUNK], kmeans.centroids, 1)[1][:, 0]
                           for s in range(0, len(x), QUERY_CHUNK)])
    order = np.argsort(cell, kind="stable")
    return _Cells(kmeans.centroids, order, np.searchsorted(cell[order], np.arange(nlist + 1)), nprobe)


def _cells_knn(x: np.ndarray, rows: np.ndarray, k: int, cells: _Cells) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_flat_knn` for the vectors ``x[rows]`` against ``x``, scanning only each query's nearest cells;
    the queries probing a cell are compared with its vectors in blocks of matrix products."""
    queries = x[rows]
    probes = _flat_knn(queries, cells.centroids, cells.nprobe)[1].ravel()
    by_cell = np.argsort(probes, kind="stable")
    owner = by_cell // cells.nprobe
    starts = np.searchsorted(probes[by_cell], np.arange(len(cells.bounds)))
    heap = faiss.ResultHeap(len(rows), k, keep_max=True)
    for c in range(len(cells.bounds) - 1):
        probing = owner[starts[c]:starts[c + 1]]
        for m in range(cells.bounds[c], cells.bounds[c + 1], BLOCK):
            members = cells.order[m:min(m + BLOCK, cells.bounds[c + 1])]
            database = x[members]
            for q in range(0, len(probing), BLOCK):
                subset = probing[q:q + BLOCK]
                heap.add_result_subset(subset, queries[subset] @ database.T, members)
    heap.finalize()
    return heap.D, heap.I


def _searcher(x: np.ndarray, exact_limit: int, seed: int) -> tuple[Search, dict[str, Any]]:
    """The k-NN search of ``x`` against itself, exact up to ``exact_limit`` vectors, and its parameters."""
    if len(x) <= exact_limit:
        return (lambda rows, k: _flat_knn(x[rows], x, k)), {"type": "exact", "exact_limit": exact_limit}
    cells = _build_cells(x, seed)
    nlist = len(cells.centroids)
    info = {"type": "inverted_lists", "exact_limit": exact_limit, "nlist": nlist, "nprobe": cells.nprobe,
            "train_size": min(len(x), nlist * CELL_POINTS)}
    return (lambda rows, k: _cells_knn(x, rows, k, cells)), info


def _hits(scores: np.ndarray, ids: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Same-artist flags of the results of the query ``rows``, most similar first (equal scores: lower id first),
    without their own image (the last result is dropped where the own image is not among them); missing
    results (-1) are misses."""
    ids = np.take_along_axis(ids, np.lexsort((ids, -scores), axis=-1), axis=-1)
    own = ids == rows[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), ids.shape[1] - 1)
    keep = np.ones(ids.shape, bool)
    keep[np.arange(len(rows)), drop] = False
    ids = ids[keep].reshape(len(rows), -1)
    return (ids >= 0) & (labels[ids] == labels[rows][:, None])


def _score(hits: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Sums over queries of the metrics of their ranked same-artist flags ``hits``."""
    positions = np.arange(1, hits.shape[1] + 1)
    found = hits.any(axis=1)
    precision = np.cumsum(hits, axis=1) / positions
    in_top_r = positions[None] <= relevant[:, None]
    sums = {f"recall@{k}": float(hits[:, :k].any(axis=1).sum()) for k in ks}
    sums["map@r"] = float(((precision * (hits & in_top_r)).sum(axis=1) / relevant).sum())
    sums["mrr"] = float(np.where(found, 1.0 / (hits.argmax(axis=1) + 1), 0.0).sum())
    sums["first_hit_beyond_depth"] = int((~found).sum())
    sums["map_truncated"] = int((relevant > hits.shape[1]).sum())
    return sums


def _run(search: Search, chunks: list[tuple[np.ndarray, int]], labels: np.ndarray, relevant: np.ndarray,
         ks: tuple[int, ...]) -> dict[str, float]:
    """Search every chunk of query rows ``depth + 1`` deep (the own image comes back too) and sum the metrics."""
    sums: dict[str, float] = {}
    for rows, depth in chunks:
        scores, ids = search(rows, depth + 1)
        for s in range(0, len(rows), BLOCK):
            hits = _hits(scores[s:s + BLOCK], ids[s:s + BLOCK], rows[s:s + BLOCK], labels)
            part = _score(hits, relevant[rows[s:s + BLOCK]], ks)
            sums = {key: sums.get(key, 0) + value for key, value in part.items()}
    return sums


def _means(sums: dict[str, float], count: int, ks: tuple[int, ...]) -> dict[str, float]:
    n = max(count, 1)
    return {**{f"recall@{k}": sums.get(f"recall@{k}", 0.0) / n for k in ks},
            "map@r": sums.get("map@r", 0.0) / n, "mrr": sums.get("mrr", 0.0) / n}


def _chunks(queries: np.ndarray, depth: np.ndarray, size: int) -> list[tuple[np.ndarray, int]]:
    """Queries sorted by depth in groups of ``size``, each with the depth of its deepest query."""
    order = np.argsort(depth, kind="stable")
    return [(queries[order[s:s + size]], int(depth[order[s:s + size]].max())) for s in range(0, len(order), size)]


def _check_memory(count: int, dim: int, chunks: list[tuple[np.ndarray, int]], query_chunk: int,
                  memory_limit: int | None) -> None:
    """Stop with one line when the vectors and the results held at once would not fit in ``memory_limit``."""
    limit = available_memory() if memory_limit is None else memory_limit
    rows, depth = max(((len(r), d + 1) for r, d in chunks), key=lambda c: c[0] * c[1])
    results = rows * depth * RESULT_BYTES + min(rows, BLOCK) * depth * SCORING_BYTES
    probes = rows * _cell_counts(count)[1] * 24  # probed cells, their order and owners
    need = count * dim * 4 + count * 16 + rows * dim * 4 + BLOCK * BLOCK * 4 + probes + results
    if limit is not None and need > limit:
        raise UserError(
            f"retrieval over {count:,} vectors needs about {_size(need)} ({rows:,} queries x {depth:,} results held "
            f"at once as int64 ids + float32 scores: {_size(results)}, plus the vectors) but {_size(limit)} is "
            f"available; lower --query-chunk (now {query_chunk:,}) or --max-depth")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _agreement(x: np.ndarray, search: Search, queries: np.ndarray, depth: np.ndarray, labels: np.ndarray,
               relevant: np.ndarray, ks: tuple[int, ...], seed: int) -> dict[str, Any]:
    """The metrics of a sample of queries from exact search and from ``search``, and the share of the exact
    neighbours ``search`` finds."""
    pick = np.sort(np.random.default_rng(seed).choice(len(queries), min(AGREEMENT_SAMPLE, len(queries)),
                                                      replace=False))
    chunk = [(queries[pick], int(depth[pick].max()))]
    exact = lambda rows, k: _flat_knn(x[rows], x, k)  # noqa: E731
    found = search(chunk[0][0], chunk[0][1] + 1)[1]
    truth = exact(chunk[0][0], chunk[0][1] + 1)[1]
    shared = np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in zip(truth, found, strict=True)])
    return {"sample_queries": len(pick), "neighbour_recall": float(shared),
            "exact": _means(_run(exact, chunk, labels, relevant, ks), len(pick), ks),
            "approximate": _means(_run(search, chunk, labels, relevant, ks), len(pick), ks)}


def retrieval_metrics(features: np.ndarray, labels: list[str] | np.ndarray, ks: tuple[int, ...] = (1, 5, 10), *,
                      exact_limit: int = EXACT_LIMIT, query_chunk: int = QUERY_CHUNK, max_depth: int | None = None,
                      memory_limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Recall@k, mAP@R and MRR of leave-one-out retrieval over ``features`` (normalised here) labelled ``labels``.

    ``max_depth`` caps the results searched per query (default: R of its artist, at least ``MIN_DEPTH``);
    ``memory_limit`` (bytes; default: the available memory) is checked before searching.
    """
    if max_depth is not None and max_depth < max(ks):
        raise UserError(f"--max-depth {max_depth} is below the largest k of Recall@k ({max(ks)}); raise it")
    if query_chunk < 1:
        raise UserError(f"--query-chunk must be at least 1, got {query_chunk}")
    _, labels, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    relevant = counts[labels] - 1
    queries = np.flatnonzero(relevant > 0)
    depth = np.minimum(np.maximum(relevant[queries], max(max(ks), MIN_DEPTH)), len(labels) - 1)
    if max_depth is not None:
        depth = np.minimum(depth, max_depth)
    chunks = _chunks(queries, depth, query_chunk)
    report: dict[str, Any] = {}
    sums: dict[str, float] = {}
    if chunks:
        _check_memory(len(labels), np.shape(features)[1], chunks, query_chunk, memory_limit)
        x = l2_normalize(features, "feature vector")
        search, report["search"] = _searcher(x, exact_limit, seed)
        sums = _run(search, chunks, labels, relevant, ks)
        if report["search"]["type"] != "exact":
            report["search"]["agreement"] = _agreement(x, search, queries, depth, labels, relevant, ks, seed)
        report["search_depth"] = {"min": int(depth.min()), "max": int(depth.max()), "cap": max_depth}
    return {"num_images": int(len(labels)), "num_artists": int(len(counts)), "num_queries": int(len(queries)),
            "num_unanswerable": int(len(labels) - len(queries)), "normalized": True, "metric": "cosine",
            **_means(sums, len(queries), ks), "first_hit_beyond_depth": int(sums.get("first_hit_beyond_depth", 0)),
            "map_truncated": int(sums.get("map_truncated", 0)), **report}


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
