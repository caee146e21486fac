"""Scale step ``gallery``: a 50,000-artist x 10-reference gallery of 448-value style vectors, built, calibrated on 3
held-out vectors per artist, saved, loaded, queried, and changed by one artist (added, then removed).

    python bench/bench_scale.py --steps gallery [--quick]

Vectors are clustered per artist (:mod:`scale_common`). ``--add`` and ``--remove`` are timed as
``tools/build_gallery.py`` runs them after embedding: load the gallery, change it, save it (the embedding of the
new artist's images is the model's cost, not the gallery's).
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scale_common import artist_centres, measure, vectors_around

from retrieval.gallery import Gallery, load_gallery, save_gallery

DIM = 448
MODEL = {"architecture": "synthetic", "descriptor": "texture", "feature_dim": DIM}
ARTISTS_PER_CHUNK = 10_000


def per_artist(centres: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` vectors of every artist, artist by artist, with the artists' names."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(centres) * count, centres.shape[1]), np.float32)
    for start in range(0, len(centres), ARTISTS_PER_CHUNK):
        labels = np.repeat(np.arange(start, min(start + ARTISTS_PER_CHUNK, len(centres))), count)
        out[start * count:start * count + len(labels)] = vectors_around(centres, labels, 1.0, rng)
    return out, [f"artist_{i:05d}" for i in range(len(centres)) for _ in range(count)]


def gallery_step(quick: bool) -> list[dict]:
    return run_gallery(*((2_000, 10, 3) if quick else (50_000, 10, 3)))


def run_gallery(artists: int, refs: int, held: int) -> list[dict]:
    """The gallery rows at ``artists`` x ``refs`` references and ``held`` held-out vectors per artist."""
    size = f"{artists:,} artists x {refs} refs x {DIM}"
    centres = artist_centres(artists + 1, DIM, seed=0)
    vectors, names = per_artist(centres[:artists], refs, seed=1)
    held_out, truth = per_artist(centres[:artists], held, seed=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gallery"
        with measure() as step:
            gallery = Gallery(vectors, names, [f"/refs/{n}/{i}.png" for i, n in enumerate(names)], MODEL)
            rate = gallery.calibrate(held_out, truth, 0.05)
            save_gallery(gallery, folder)
        rows.append({"path": "gallery: build + calibrate + save", "size": f"{size}, {held} held-out",
                     "seconds": step.seconds, "peak_gib": step.peak_gib, "before": "killed at 12 GB (44k)",
                     "target": "<= 6 GB", "note": f"index {gallery.index()[1]['type']}, false unknown {rate:.3f}"})
        del gallery, vectors, held_out
        with measure() as step:
            gallery = load_gallery(folder)
        rows.append({"path": "gallery: load", "size": size, "seconds": step.seconds, "peak_gib": step.peak_gib,
                     "before": "18.9 s (44k)", "note": "vectors memory-mapped, prototypes read"})
        rows.append(identify_row(gallery, centres, size))
        new, new_names = per_artist(centres[artists:], refs, seed=3)
        del gallery
        with measure() as step:
            save_gallery(load_gallery(folder).extended(new, ["artist_new"] * refs, [f"/new/{i}.png" for i in
                                                                                      range(refs)]), folder)
        rows.append({"path": "gallery: --add one artist", "size": f"{size} + {refs}", "seconds": step.seconds,
                     "peak_gib": step.peak_gib, "before": "46 s, 5.8 GB (44k)", "target": "<= 5 s",
                     "note": "load + add + save"})
        with measure() as step:
            save_gallery(load_gallery(folder).removed("artist_00007"), folder)
        rows.append({"path": "gallery: --remove one artist", "size": size, "seconds": step.seconds,
                     "peak_gib": step.peak_gib, "before": "30 s, 6.3 GB (44k)", "note": "load + remove + save"})
    return rows


def identify_row(gallery: Gallery, centres: np.ndarray, size: str) -> dict:
    """Median wall time of identifying one image (top 5 artists, unknown decision), the prototype scores cached."""
    queries = vectors_around(centres, np.arange(0, 50), 1.0, np.random.default_rng(4))
    gallery.match(queries[:1], 5)  # the first call reads the thresholds once
    times = []
    with measure() as step:
        for query in queries:
            start = time.perf_counter()
            gallery.match(query[None], 5)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"path": "gallery: identify one image", "size": size, "seconds": median, "peak_gib": step.peak_gib,
            "before": "56-75 ms (44k)", "target": "<= 5 ms", "note": f"median of {len(times)}: {median * 1e3:.2f} ms"}


STEPS = {"gallery": gallery_step}
