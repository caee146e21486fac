"""Shared pieces of the scale benchmarks: clustered synthetic style vectors and per-step time / peak memory.

Real style vectors cluster by artist, so every generator here draws each vector around its artist's unit centre
(uniform random vectors are the worst case of IVF indexes and unlike real embeddings). Peak memory is the process's
``VmHWM`` (peak resident set) after resetting it through ``/proc/self/clear_refs``, so each measured step reports
its own peak, not the largest of the whole process.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

CHUNK = 100_000  # vectors generated at once


def rss_gib(key: str = "VmHWM") -> float:
    """The process's peak (``VmHWM``) or current (``VmRSS``) resident memory, GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> None:
    """Start a new peak: ``VmHWM`` drops to the current resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


@dataclass
class Step:
    """One measured step: wall seconds and peak resident GiB (set when its ``measure`` block ends)."""

    seconds: float = 0.0
    peak_gib: float = 0.0
    extra: dict = field(default_factory=dict)


@contextmanager
def measure() -> Iterator[Step]:
    """Time a block and record the peak resident memory reached inside it."""
    step = Step()
    reset_peak()
    start = time.perf_counter()
    try:
        yield step
    finally:
        step.seconds = time.perf_counter() - start
        step.peak_gib = rss_gib()


def artist_centres(artists: int, dim: int, seed: int) -> np.ndarray:
    """``artists`` random unit centres (float32)."""
    centres = np.random.default_rng(seed).standard_normal((artists, dim), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def vectors_around(centres: np.ndarray, labels: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors, row ``i`` around ``centres[labels[i]]`` with Gaussian noise of total norm about ``noise``."""
    chunk = centres[labels]
    chunk += rng.standard_normal(chunk.shape, dtype=np.float32) * np.float32(noise / np.sqrt(centres.shape[1]))
    return chunk / np.linalg.norm(chunk, axis=1, keepdims=True)


def clustered_chunks(count: int, dim: int, artists: int, noise: float = 1.0, seed: int = 0,
                     chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(vectors, artist ids)`` chunks of ``count`` unit vectors, each artist drawn uniformly."""
    centres = artist_centres(artists, dim, seed)
    rng = np.random.default_rng(seed + 1)
    for start in range(0, count, chunk):
        labels = rng.integers(0, artists, min(chunk, count - start))
        yield vectors_around(centres, labels, noise, rng), labels


def clustered_vectors(count: int, dim: int, artists: int, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """:func:`clustered_chunks` gathered into one ``count x dim`` float32 array (one copy in memory)."""
    out = np.empty((count, dim), np.float32)
    start = 0
    for vectors, _ in clustered_chunks(count, dim, artists, noise, seed):
        out[start:start + len(vectors)] = vectors
        start += len(vectors)
    return out
