"""Faiss inner-product search over L2-normalised style vectors (inner product = cosine similarity).

The index is chosen from the number of vectors, their size and a memory budget (:func:`index_parameters`):

- up to ``EXACT_LIMIT`` vectors: exact ``IndexFlatIP``;
- above it, while the vectors fit the budget: ``IndexIVFFlat`` (inverted lists over k-means cells, exact scores
  inside the visited cells);
- above the budget: ``IndexIVFPQ`` (vectors compressed to ``m`` one-byte codes) whose shortlist is re-scored
  exactly against the stored vectors (:class:`RerankedIndex`; on a gallery they are memory-mapped, not read).

Vectors are given as one array or a list of parts (arrays or ``np.load(..., mmap_mode="r")`` memory maps); the
index is trained on a sample and filled block by block, so no full copy of the vectors is made. The chosen index
and its parameters are returned as a JSON-ready dict so galleries and reports can record them.
"""

import math
import mmap
from collections.abc import Iterator, Sequence
from typing import Any

import faiss
import numpy as np

from utils import UserError

EXACT_LIMIT = 100_000  # up to this many vectors, search exactly
INDEX_MEMORY_GIB = 4.0  # default memory budget of a reference index (--index-memory-gib)
TRAIN_POINTS_PER_LIST = 40  # k-means training sample per inverted list (Faiss warns below 39)
MIN_NPROBE = 16
BLOCK_ROWS = 65_536  # vectors read, normalised or added at once
PQ_TRAIN_SIZE = 16_384  # least training sample of a product quantizer (64 points per centroid)
PQ_DIMS_PER_CODE = 8  # values per one-byte PQ code, at the finest (finer codes train much slower)
PQ_TRAIN_ITERATIONS = 10  # k-means iterations per PQ sub-vector (Faiss's 25 take 4x as long; re-ranking is exact)
PQ_PROBE_SHARE = 5  # IVF-PQ visits one list in 5 (one in 10 gave recall@10 0.95 on 500k clustered
# vectors, one in 5 0.98)
RERANK_SHORTLIST = 256  # PQ candidates per query re-scored exactly (at least 10 x top_k)
GIB = 2**30

Parts = np.ndarray | Sequence[np.ndarray]


def l2_normalize(vectors: np.ndarray, what: str = "vector", first: int = 0) -> np.ndarray:
    """Rows scaled to unit length as contiguous float32; a zero or non-finite row is a :class:`UserError`
    (numbered from ``first``)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise UserError(f"{what}s must be an N x D matrix, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise UserError(f"{what} {first + int(np.argmax(bad))} is all zeros or not finite, so it has no direction; "
                        "re-extract it")
    return np.ascontiguousarray(vectors / norms)


def check_memory(need: float, budget_gib: float, what: str, option: str) -> None:
    """Refuse (one line) a step whose estimated ``need`` in bytes exceeds ``budget_gib``."""
    if need > budget_gib * GIB:
        raise UserError(f"{what} needs {need / GIB:.1f} GiB, more than the {budget_gib:g} GiB budget; {option}")


def ivf_parameters(count: int, share: int = 10) -> dict[str, Any]:
    """IVF parameters for ``count`` vectors: about sqrt(count) lists, one in ``share`` of them visited (at least
    16)."""
    nlist = max(1, int(round(math.sqrt(count))))
    return {"type": "ivf_flat_ip", "nlist": nlist, "nprobe": min(nlist, max(MIN_NPROBE, nlist // share)),
            "train_size": min(count, nlist * TRAIN_POINTS_PER_LIST)}


def pq_code_size(dim: int, budget: float, count: int, nlist: int) -> int | None:
    """Bytes per vector of the finest product quantizer (a divisor of ``dim``, at least ``PQ_DIMS_PER_CODE``
    values per byte) whose codes, ids and coarse centroids fit ``budget`` bytes; None when none fits."""
    for m in sorted((m for m in range(1, dim // PQ_DIMS_PER_CODE + 1) if dim % m == 0), reverse=True):
        if count * (m + 8) + nlist * dim * 4 <= budget:
            return m
    return None


def index_parameters(count: int, dim: int, exact_limit: int = EXACT_LIMIT,
                     memory_gib: float = INDEX_MEMORY_GIB) -> dict[str, Any]:
    """The index for ``count`` vectors of ``dim`` values: exact, IVF-Flat, or IVF-PQ with exact re-ranking when
    the vectors need more than ``memory_gib``; a size no index fits is a one-line :class:`UserError`."""
    limits = {"exact_limit": exact_limit, "memory_gib": memory_gib}
    if count <= exact_limit:
        return {"type": "flat_ip", **limits}
    if count * dim * 4 <= memory_gib * GIB:
        return {**ivf_parameters(count), **limits}
    ivf = ivf_parameters(count, PQ_PROBE_SHARE)
    m = pq_code_size(dim, memory_gib * GIB, count, ivf["nlist"])
    if m is None:
        check_memory(count * (1 + 8), memory_gib, f"an index of {count} vectors", "raise --index-memory-gib")
        raise UserError(f"no product quantizer divides {dim}-value vectors; raise --index-memory-gib")
    return {**ivf, "type": "ivf_pq_ip", "pq_m": m, "pq_bits": 8, "shortlist": RERANK_SHORTLIST,
            "train_size": min(count, max(ivf["train_size"], PQ_TRAIN_SIZE)), **limits}


def part_list(vectors: Parts) -> list[np.ndarray]:
    """``vectors`` as a list of 2-D parts."""
    return [vectors] if isinstance(vectors, np.ndarray) else list(vectors)


def read_block(part: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``part`` as a contiguous float32 array. A whole-file memory map is read with file
    reads, so the pages do not stay mapped (and counted) in this process."""
    if isinstance(part, np.memmap) and isinstance(part.base, mmap.mmap) and part.flags.c_contiguous:
        row_bytes = part.dtype.itemsize * part.shape[1]
        with open(part.filename, "rb") as f:
            f.seek(part.offset + start * row_bytes)
            block = np.fromfile(f, part.dtype, (stop - start) * part.shape[1]).reshape(stop - start, -1)
        return block.astype(np.float32, copy=False)
    return np.ascontiguousarray(part[start:stop], dtype=np.float32)


def row_blocks(vectors: Parts, rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Consecutive blocks of at most ``rows`` rows over all parts, as contiguous float32 arrays."""
    for part in part_list(vectors):
        for start in range(0, len(part), rows):
            yield read_block(part, start, min(start + rows, len(part)))


def gather_rows(vectors: Parts, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (positions over all parts, any order) as one float32 array."""
    parts = part_list(vectors)
    ends = np.cumsum([len(p) for p in parts])
    flat = np.asarray(ids, np.int64).ravel()
    which = np.searchsorted(ends, flat, side="right")
    out = np.empty((len(flat), parts[0].shape[1]), np.float32)
    for p in np.unique(which):
        hit = which == p
        out[hit] = parts[p][flat[hit] - (ends[p] - len(parts[p]))]
    return out.reshape(*np.shape(ids), -1)


def best_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, columns)`` of the ``k`` largest entries of each row of ``scores``, best first."""
    k = min(k, scores.shape[1])
    columns = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.broadcast_to(np.arange(k), scores.shape).copy()
    best = np.take_along_axis(scores, columns, 1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(best, order, 1), np.take_along_axis(columns, order, 1)


class RerankedIndex:
    """An IVF-PQ index whose shortlist of ``shortlist`` candidates is re-scored exactly against ``vectors``.

    It answers ``search``, ``d`` and ``ntotal`` like a Faiss index; ``index`` is the Faiss index (what is saved).
    """

    def __init__(self, index: faiss.Index, vectors: Parts, shortlist: int):
        self.index, self.vectors, self.shortlist = index, part_list(vectors), shortlist
        self.d = index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wide = min(max(self.shortlist, 10 * k), self.ntotal)
        scores, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        step = max(1, BLOCK_ROWS // wide)
        for start in range(0, len(queries), step):
            block = queries[start:start + step]
            candidates = self.index.search(block, wide)[1]
            exact = np.einsum("qd,qcd->qc", block, gather_rows(self.vectors, np.maximum(candidates, 0)))
            exact[candidates < 0] = -np.inf
            best, columns = best_of(exact, k)
            scores[start:start + step] = best
            ids[start:start + step] = np.where(np.isfinite(best), np.take_along_axis(candidates, columns, 1), -1)
        return scores, ids


def train_sample(vectors: Parts, size: int, seed: int) -> np.ndarray:
    """``size`` distinct rows drawn at random (read in position order)."""
    count = sum(len(p) for p in part_list(vectors))
    return gather_rows(vectors, np.sort(np.random.default_rng(seed).choice(count, size, replace=False)))


def build_index(vectors: Parts, exact_limit: int = EXACT_LIMIT, seed: int = 0,
                memory_gib: float = INDEX_MEMORY_GIB) -> tuple[Any, dict]:
    """An inner-product index over unit ``vectors`` (one array or a list of parts) chosen by
    :func:`index_parameters`, trained on a sample and filled block by block. Returns the index (a Faiss index, or
    a :class:`RerankedIndex` for IVF-PQ) and its parameters."""
    parts = part_list(vectors)
    count, dim = sum(len(p) for p in parts), parts[0].shape[1]
    params = index_parameters(count, dim, exact_limit, memory_gib)
    if params["type"] == "flat_ip":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if params["type"] == "ivf_pq_ip":
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"],
                                     faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.niter = PQ_TRAIN_ITERATIONS
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(train_sample(parts, params["train_size"], seed))
        index.nprobe = params["nprobe"]
    for block in row_blocks(parts):
        index.add(block)
    return wrap_index(index, parts, params), params


def wrap_index(index: faiss.Index, vectors: Parts, params: dict) -> Any:
    """``index`` ready to search: IVF-PQ wrapped for exact re-ranking against ``vectors``."""
    if params["type"] == "ivf_pq_ip":
        return RerankedIndex(index, vectors, int(params["shortlist"]))
    return index


def remove_rows(index: faiss.Index, rows: np.ndarray) -> None:
    """Drop the sorted positions ``rows`` from an IVF index whose ids are row positions; later rows move up."""
    ivf = faiss.extract_index_ivf(index)
    ivf.remove_ids(faiss.IDSelectorBatch(np.asarray(rows, np.int64)))
    for cell in range(ivf.nlist):
        size = ivf.invlists.list_size(cell)
        if size:
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(cell), size)
            ids -= np.searchsorted(rows, ids)


def check_queries(queries: np.ndarray, dim: int, top_k: int) -> None:
    """Refuse (one line) a ``top_k`` below 1 or query vectors of another size than ``dim``."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if queries.shape[1] != dim:
        raise UserError(f"query vectors have {queries.shape[1]} values but the index holds {dim}-value vectors; "
                        "use features from the model the index was built with")


def search(index: Any, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(len(queries), k)`` best first, ``k = min(top_k, index.ntotal)``."""
    check_queries(queries, index.d, top_k)
    k = min(top_k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids
