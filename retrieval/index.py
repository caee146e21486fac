"""Faiss inner-product search over L2-normalised style vectors (inner product = cosine similarity).

Small collections get an exact ``IndexFlatIP``; above ``EXACT_LIMIT`` vectors an ``IndexIVFFlat`` (inverted lists
over k-means cells, exact scores inside the visited cells) answers much faster at a small recall cost. The chosen
index and its parameters are returned as a JSON-ready dict so galleries and reports can record them.
"""

import math
from typing import Any

import faiss
import numpy as np

from utils import UserError

EXACT_LIMIT = 100_000  # up to this many vectors, search exactly
TRAIN_POINTS_PER_LIST = 40  # k-means training sample per inverted list (Faiss warns below 39)
MIN_NPROBE = 16


def l2_normalize(vectors: np.ndarray, what: str = "vector") -> np.ndarray:
    """Rows scaled to unit length as contiguous float32; a zero or non-finite row is a :class:`UserError`."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise UserError(f"{what}s must be an N x D matrix, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise UserError(f"{what} {int(np.argmax(bad))} is all zeros or not finite, so it has no direction; "
                        "re-extract it")
    return np.ascontiguousarray(vectors / norms)


def ivf_parameters(count: int) -> dict[str, Any]:
    """IVF parameters for ``count`` vectors: about sqrt(count) lists, a tenth of them visited (at least 16)."""
    nlist = max(1, int(round(math.sqrt(count))))
    return {"type": "ivf_flat_ip", "nlist": nlist, "nprobe": min(nlist, max(MIN_NPROBE, nlist // 10)),
            "train_size": min(count, nlist * TRAIN_POINTS_PER_LIST)}


def build_index(vectors: np.ndarray, exact_limit: int = EXACT_LIMIT, seed: int = 0) -> tuple[faiss.Index, dict]:
    """An inner-product index over unit ``vectors``: exact up to ``exact_limit`` vectors, IVF above.

    Returns the index and its parameters (``type`` ``flat_ip`` or ``ivf_flat_ip`` with ``nlist``, ``nprobe``,
    ``train_size``).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if count <= exact_limit:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"type": "flat_ip", "exact_limit": exact_limit}
    params = {**ivf_parameters(count), "exact_limit": exact_limit}
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(count, params["train_size"], replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = params["nprobe"]
    return index, params


def search(index: faiss.Index, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(len(queries), k)`` best first, ``k = min(top_k, index.ntotal)``."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if queries.shape[1] != index.d:
        raise UserError(f"query vectors have {queries.shape[1]} values but the index holds {index.d}-value vectors; "
                        "use features from the model the index was built with")
    k = min(top_k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids
