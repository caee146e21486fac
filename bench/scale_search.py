"""Scale step ``search``: 5M clustered 448-value style vectors written as ``features.npy`` + ``image_names.txt`` in
chunks, a gallery built from them block by block (its index chosen from the default memory budget: IVF-PQ re-ranked
exactly against the memory-mapped vectors), loaded, and searched; recall@10 against exact search, computed
chunk-wise over the same vectors.

    python bench/bench_scale.py --steps search [--quick]

``--quick`` runs 100k vectors with a budget small enough to take the same IVF-PQ path.
"""

import tempfile
from pathlib import Path

import numpy as np
from scale_common import clustered_chunks, measure

from retrieval.gallery import build_from_features, load_gallery, save_rows
from retrieval.index import best_of, row_blocks, search

DIM = 448
QUERIES = 200


def write_features(folder: Path, count: int, artists: int) -> np.ndarray:
    """``features.npy`` (``count`` vectors) and ``image_names.txt`` written chunk by chunk; returns ``QUERIES``
    further vectors of the same artists as queries."""
    chunks = clustered_chunks(count + QUERIES, DIM, artists)
    first, labels = next(chunks)
    queries = first[:QUERIES].copy()

    def rest():
        yield first[QUERIES:], labels[QUERIES:]
        yield from chunks

    row = 0
    with open(folder / "image_names.txt", "w", encoding="utf-8") as names:
        def blocks():
            nonlocal row
            for vectors, ids in rest():
                names.write("".join(f"artist_{a:05d}/{row + i:07d}.png\n" for i, a in enumerate(ids)))
                row += len(vectors)
                yield vectors
        save_rows(folder / "features.npy", blocks(), count, DIM)
    return queries


def exact_top10(parts: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """Exact top-10 ids over all parts, one block of vectors at a time."""
    best_scores, best_ids, start = np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), int), 0
    for block in row_blocks(parts):
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + len(block)), (len(queries),
                                                                                               len(block)))], axis=1)
        best_scores, columns = best_of(scores, 10)
        best_ids = np.take_along_axis(ids, columns, 1)
        start += len(block)
    return best_ids


def search_step(quick: bool) -> list[dict]:
    return run_search(100_000, 1_000, {"exact_limit": 20_000, "index_memory_gib": 0.05}) if quick else \
        run_search(5_000_000, 50_000, {})


def run_search(count: int, artists: int, options: dict) -> list[dict]:
    """The search rows at ``count`` vectors around ``artists`` centres; ``options`` of the gallery's index."""
    size = f"{count:,} x {DIM}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with measure() as step:
            queries = write_features(folder, count, artists)
        rows.append({"path": "search: write features (chunks)", "size": size, "seconds": step.seconds,
                     "peak_gib": step.peak_gib})
        names = (folder / "image_names.txt").read_text(encoding="utf-8").splitlines()
        with measure() as step:
            gallery = build_from_features(folder / "features.npy", [n.split("/")[0] for n in names], names,
                                          {"descriptor": "texture"}, folder / "gallery", **options)
        params = gallery.index()[1]
        del gallery, names
        rows.append({"path": "search: gallery from features.npy", "size": size, "seconds": step.seconds,
                     "peak_gib": step.peak_gib, "before": "past 12 GB at 2M (save_gallery)", "target": "<= 16 GB",
                     "note": ", ".join(f"{k} {params[k]}" for k in ("type", "nlist", "nprobe", "pq_m", "shortlist")
                                       if k in params)})
        with measure() as step:
            gallery = load_gallery(folder / "gallery")
            index = gallery.index()[0]
            found = search(index, queries, 10)[1]
        truth = exact_top10(gallery.parts, queries)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]))
        rows.append({"path": "search: load + 200 queries", "size": size, "seconds": step.seconds,
                     "peak_gib": step.peak_gib, "target": "recall@10 >= 0.9, <= 16 GB",
                     "note": f"recall@10 {recall:.3f} vs exact (clustered, {artists:,} artists)"})
    return rows


STEPS = {"search": search_step}
