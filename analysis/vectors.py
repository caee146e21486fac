"""Rank reference style vectors by cosine similarity to query vectors, optionally centred on the mean reference."""

import numpy as np

from utils import UserError

__all__ = ["format_table", "rank_by_cosine"]


def _unit_rows(matrix: np.ndarray, names: list[str], what: str, centred: bool) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        where, fix = ("after --normalize centring ", "drop --normalize") if centred else ("", "drop that vector")
        raise UserError(f"{what} {names[zero[0]]} is {where}a zero vector, so its cosine similarity is undefined; "
                        f"{fix}")
    return matrix / norms


def rank_by_cosine(
    queries: np.ndarray,
    references: np.ndarray,
    top_k: int,
    query_names: list[str],
    reference_names: list[str],
    normalize: bool = False,
) -> list[dict]:
    """The ``top_k`` most similar references for every query, best first.

    Returns records ``{"query", "rank", "reference", "similarity"}`` (rank starts at 1). With ``normalize`` all
    vectors are first centred on the mean reference vector.
    """
    if queries.shape[1] != references.shape[1]:
        raise UserError(f"query vectors have shape {queries.shape} but the references have shape {references.shape};"
                        " both must have the same vector length (use features from the same model)")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    queries, references = queries.astype(np.float64), references.astype(np.float64)
    if normalize:
        if len(references) < 2:
            raise UserError("--normalize centres on the mean reference vector and needs at least 2 references")
        mean = references.mean(axis=0)
        queries, references = queries - mean, references - mean
    queries = _unit_rows(queries, query_names, "query", normalize)
    references = _unit_rows(references, reference_names, "reference", normalize)
    sims = np.clip(queries @ references.T, -1.0, 1.0)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :top_k]
    return [
        {"query": query_names[q], "rank": r + 1, "reference": reference_names[j], "similarity": float(sims[q, j])}
        for q in range(len(queries))
        for r, j in enumerate(order[q])
    ]


def format_table(results: list[dict]) -> str:
    """Plain-text table of the results, one block per query."""
    lines = []
    for record in results:
        if record["rank"] == 1:
            lines += [""] if lines else []
            lines += [f"query: {record['query']}", f"{'rank':>5}  {'similarity':>10}  reference"]
        lines.append(f"{record['rank']:>5}  {record['similarity']:>10.4f}  {record['reference']}")
    return "\n".join(lines)
