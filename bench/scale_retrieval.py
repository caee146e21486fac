"""Scale steps for retrieval evaluation and clustering (run by ``bench_scale.py``).

- ``evaluate_retrieval``: ``tools/evaluate_retrieval.py`` on 500,000 clustered 448-value vectors (5,000 artists,
  about 100 images each) saved as ``features.npy`` + ``image_names.txt``.
- ``clustering_auto``: ``tools/extract_cluster_features.py --num-clusters auto`` on 200,000 clustered vectors
  (2,000 artists), and ``--num-clusters 1000`` on the same 200,000 distinct vectors.
"""

import tempfile
from pathlib import Path

import numpy as np
from scale_common import clustered_chunks, measure

from tools import evaluate_retrieval, extract_cluster_features
from utils import UserError

DIM = 448


def write_features(folder: Path, count: int, artists: int) -> None:
    """``count`` clustered unit vectors as ``features.npy`` (written chunk by chunk) and their names."""
    array = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32, shape=(count, DIM))
    with open(folder / "image_names.txt", "w", encoding="utf-8") as names:
        start = 0
        for vectors, labels in clustered_chunks(count, DIM, artists):
            array[start:start + len(vectors)] = vectors
            names.writelines(f"artist{label:05d}/{start + i:07d}.jpg\n" for i, label in enumerate(labels))
            start += len(vectors)
    array.flush()
    del array


def evaluate_retrieval_step(quick: bool) -> list[dict]:
    count, artists = (20_000, 200) if quick else (500_000, 5_000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_features(folder, count, artists)
        args = evaluate_retrieval.get_args_parser().parse_args(
            ["--features", str(folder / "features.npy"), "--names", str(folder / "image_names.txt"),
             "--output", str(folder / "metrics.json")])
        with measure() as step:
            report = evaluate_retrieval.main(args)["retrieval"]
    search = report["search"]
    note = f"{search['type']} search, mAP@R {report['map@r']:.4f}, R@1 {report['recall@1']:.4f}"
    if "agreement" in search:
        agreement = search["agreement"]
        note += (f"; nlist {search['nlist']} nprobe {search['nprobe']}; on {agreement['sample_queries']} queries "
                 f"mAP@R {agreement['approximate']['map@r']:.4f} vs exact {agreement['exact']['map@r']:.4f}, "
                 f"neighbour recall {agreement['neighbour_recall']:.3f}")
    return [{"path": "evaluate_retrieval.py (R@k, mAP@R, MRR)", "size": f"{count:,} x {DIM}, {artists:,} artists",
             "seconds": step.seconds, "peak_gib": step.peak_gib,
             "before": "projected ~17 h; +6.4 GiB per 256 queries" if not quick else None, "target": "<= 15 min",
             "note": note}]


def cluster(folder: Path, num_clusters: str) -> tuple[dict, str]:
    """Run extract_cluster_features.py on the saved features: (measured row fields, outcome)."""
    args = extract_cluster_features.get_args_parser().parse_args(
        ["--features", str(folder / "features.npy"), "--num-clusters", num_clusters,
         "--output-dir", str(folder / f"clusters_{num_clusters}")])
    with measure() as step:
        try:
            result = extract_cluster_features.main(args)
            outcome = (f"k={result.num_clusters}, silhouette {result.silhouette:.4f}, "
                       f"{result.reseeded} empty clusters re-seeded")
            if result.auto_scores is not None:
                outcome += f", {len(result.auto_scores)} candidates scored"
        except UserError as error:
            outcome = f"error: {error}"
    return {"seconds": step.seconds, "peak_gib": step.peak_gib}, outcome


def clustering_step(quick: bool) -> list[dict]:
    count, artists, fixed = (3_000, 30, "30") if quick else (200_000, 2_000, "1000")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_features(folder, count, artists)
        measured, outcome = cluster(folder, "auto")
        rows.append({"path": "extract_cluster_features.py --num-clusters auto",
                     "size": f"{count:,} x {DIM}, {artists:,} artists", **measured,
                     "before": "k=10 (top of a fixed 2..10)" if not quick else None,
                     "target": f"k near {artists:,}, minutes", "note": outcome})
        measured, outcome = cluster(folder, fixed)
        rows.append({"path": f"extract_cluster_features.py --num-clusters {fixed}",
                     "size": f"{count:,} distinct vectors", **measured,
                     "before": "false 'fewer than 1000 distinct vectors' error" if not quick else None,
                     "target": f"{fixed} non-empty clusters", "note": outcome})
    return rows


STEPS = {"evaluate_retrieval": evaluate_retrieval_step, "clustering_auto": clustering_step}
