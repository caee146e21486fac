"""Scale step ``milvus``: the same 1M clustered 448-value style vectors as a Faiss folder gallery and as a Milvus Lite
gallery (``retrieval.store.build_from_features`` on a folder and on ``<tmp>/bench.db``): build/insert time, peak
memory, queries per second and recall@10 against exact search.

    python bench/bench_scale.py --steps milvus [--quick]

Both stores use the same index rule (exact up to the exact limit, IVF_FLAT with the same nlist / nprobe above it).
Peak memory is this process's plus that of any child process (Milvus Lite 2.x ran a server process; 3.x serves from a
thread of this one). ``--quick`` runs 50k vectors with an exact limit of 20k, so both take the IVF path.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
from scale_common import measure, rss_gib
from scale_search import DIM, QUERIES, exact_top10, write_features

from retrieval.gallery import load_gallery
from retrieval.milvus_gallery import disconnect
from retrieval.store import build_from_features, open_gallery


def child_pids(pid: int) -> list[int]:
    """The processes started (directly or not) by ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1]) if entry.isdigit() else -1
        except OSError:
            continue
        if parent == pid:
            found += [int(entry), *child_pids(int(entry))]
    return found


def children_peak_gib() -> float:
    """Sum of the peak resident memory (``VmHWM``) of this process's children, GiB."""
    total = 0
    for pid in child_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/status") as status:
                total += next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
        except OSError:
            pass
    return total / 2**20


def recall_at_10(truth: np.ndarray, found: list[list[int]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]))


def milvus_step(quick: bool) -> list[dict]:
    return run_milvus(50_000, 1_000, 20_000) if quick else run_milvus(1_000_000, 20_000, 100_000)


def build_and_search(features: Path, names: list[str], location: str | Path, exact_limit: int,
                     queries: np.ndarray, truth: np.ndarray, label: str, size: str) -> list[dict]:
    """Rows for building the gallery at ``location`` from ``features`` and searching it ``QUERIES`` times."""
    artists = [n.split("/")[0] for n in names]
    before = rss_gib("VmRSS")
    with measure() as step:
        gallery = build_from_features(features, artists, names, {"descriptor": "texture"}, location, exact_limit)
    held = rss_gib("VmRSS")
    params = gallery.index_parameters()
    del gallery
    rows = [{"path": f"milvus: {label} build", "size": size, "seconds": step.seconds,
             "peak_gib": step.peak_gib + children_peak_gib(),
             "note": ", ".join(f"{k} {params[k]}" for k in ("type", "nlist", "nprobe") if k in params)
             + f"; resident {before:.2f} GiB before, {held:.2f} GiB after"}]
    with measure() as step:
        gallery = load_gallery(location) if isinstance(location, Path) else open_gallery(location)
        gallery.nearest(queries[:1], 10)  # a folder builds its index here, Milvus loads the collection
    opened = step.seconds
    with measure() as step:
        found = [[work["id"] for work in row] for row in gallery.nearest(queries, 10)]
    rows.append({"path": f"milvus: {label} open + {QUERIES} queries", "size": size,
                 "seconds": opened + step.seconds, "peak_gib": step.peak_gib + children_peak_gib(),
                 "note": f"open {opened:.1f} s, {QUERIES / step.seconds:.0f} queries/s, recall@10 "
                         f"{recall_at_10(truth, found):.3f} vs exact"})
    return rows


def run_milvus(count: int, artists: int, exact_limit: int) -> list[dict]:
    """The Faiss-folder and Milvus Lite rows at ``count`` vectors around ``artists`` centres."""
    size = f"{count:,} x {DIM}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        queries = write_features(folder, count, artists)
        names = (folder / "image_names.txt").read_text(encoding="utf-8").splitlines()
        truth = exact_top10([np.load(folder / "features.npy", mmap_mode="r")], queries)
        rows = build_and_search(folder / "features.npy", names, folder / "gallery", exact_limit, queries, truth,
                                "Faiss folder", size)
        location = f"{folder / 'bench.db'}#bench"
        try:
            rows += build_and_search(folder / "features.npy", names, location, exact_limit, queries, truth,
                                     "Milvus Lite", size)
        finally:
            disconnect(location)  # its server writes into the file at exit otherwise, recreating the removed folder
    return rows


STEPS = {"milvus": milvus_step}
