"""Finding image files and verifying them in parallel, with a cache so an unchanged dataset is decoded only once.

The cache is a small SQLite file mapping (path, size, mtime) to the verification result. Paths are stored relative
to the dataset root so the cache survives moving the dataset. It is rewritten atomically (temporary file + rename),
so several processes (e.g. distributed ranks) may scan at once without corrupting it.
"""

import contextlib
import hashlib
import math
import multiprocessing
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL
from PIL import Image
from tqdm import tqdm

from .images import verify_image

__all__ = ["CACHE_FILE", "WORKER_MEMORY", "ScanCache", "available_memory", "cgroup_cpu_limit", "default_workers",
           "memory_workers", "usable_cpus",
           "verify_images", "walk_files"]

CACHE_FILE = ".image_scan_cache.sqlite"
# Peak memory of one verifying process on a near-limit image (89 MP at 4 bytes a pixel, plus the interpreter and
# Pillow): see bench/bench_verify.py.
WORKER_MEMORY = 512 * 2**20


def available_memory() -> int | None:
    """Bytes of memory available to new processes (``MemAvailable`` of /proc/meminfo, else the free pages), or
    None when the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def memory_workers() -> int | None:
    """How many verifying processes the available memory holds (at least 1), or None when it is unknown."""
    memory = available_memory()
    return None if memory is None else max(1, memory // WORKER_MEMORY)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a container's CPU quota allows, rounded up (cgroup v2 ``cpu.max``, else v1 ``cpu/cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        return max(1, math.ceil(int(quota) / int(period))) if int(quota) > 0 else None
    except (ValueError, ZeroDivisionError):  # "max": no quota
        return None


def usable_cpus() -> int:
    """CPU cores this process may use: its CPU affinity (else all cores), no more than a container's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, cgroup_cpu_limit() or cores)


def default_workers() -> int:
    """CPU cores this process may use, no more than the available memory holds verifying processes."""
    cores = usable_cpus()
    return min(cores, memory_workers() or cores)


def walk_files(directory: str | os.PathLike, recursive: bool = True) -> Iterator[Path]:
    """Yield the files in ``directory`` (sorted; sub-folders too when ``recursive``).

    Hidden folders (name starting with ".", e.g. ``.ipynb_checkpoints``) are skipped. Symlinked folders are
    followed, each real folder at most once, so symlink loops end.
    """
    seen = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            yield Path(root, name)


@dataclass(frozen=True)
class ScanCache:
    """Where verification results are cached: ``file``, with paths stored relative to ``root``."""

    file: Path
    root: Path

    @classmethod
    def for_dataset(cls, root: str | os.PathLike, fallback_dir: str | os.PathLike | None = None) -> "ScanCache | None":
        """The cache in the dataset ``root``, or in ``fallback_dir`` when the root is read-only (None if neither).

        An existing cache in the root is used even when the root is read-only.
        """
        root = Path(os.path.abspath(root))
        in_root = root / CACHE_FILE
        if in_root.is_file() or os.access(root, os.W_OK):
            return cls(in_root, root)
        if fallback_dir:
            digest = hashlib.sha1(str(root).encode("utf-8")).hexdigest()[:12]
            return cls(Path(os.path.abspath(fallback_dir)) / f".image_scan_cache-{digest}.sqlite", root)
        return None

    def key(self, path: str | os.PathLike) -> str:
        path = os.path.abspath(path)
        root = str(self.root)
        return path[len(root) + 1:] if path.startswith(root + os.sep) else path

    def load(self) -> dict[str, tuple[int, int, str | None]]:
        """``key -> (size, mtime_ns, reason)``; empty when the file is missing, unreadable or from another version."""
        if not self.file.is_file():
            return {}
        try:
            con = sqlite3.connect(f"{self.file.as_uri()}?mode=ro", uri=True)
            try:
                version = con.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
                if version is None or version[0] != _cache_version():
                    return {}
                return {path: (size, mtime, reason) for path, size, mtime, reason in con.execute("SELECT * FROM scan")}
            finally:
                con.close()
        except sqlite3.Error:
            return {}

    def save(self, entries: dict[str, tuple[int, int, str | None]]) -> str | None:
        """Replace the cache with ``entries``; return why it could not be written, or None."""
        tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            con = sqlite3.connect(tmp)
            try:
                # a private temporary file, renamed into place when complete: no journal needed
                con.execute("PRAGMA journal_mode = OFF")
                con.execute("PRAGMA synchronous = OFF")
                with con:
                    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                    con.execute("INSERT INTO meta VALUES ('version', ?)", (_cache_version(),))
                    con.execute("CREATE TABLE scan (path TEXT, size INTEGER, mtime_ns INTEGER, reason TEXT)")
                    con.executemany("INSERT INTO scan VALUES (?, ?, ?, ?)", ((k, *v) for k, v in entries.items()))
            finally:
                con.close()
            os.replace(tmp, self.file)
        except (OSError, sqlite3.Error) as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return str(err)
        return None

    def record(self, paths: Iterable[str | os.PathLike], reasons: Iterable[str | None]) -> str | None:
        """Add fresh results for ``paths`` to the cache (stat-ing each file now); return a write error or None."""
        entries = self.load()
        for path, reason in zip(paths, reasons, strict=True):
            stat = os.stat(path)
            entries[self.key(path)] = (stat.st_size, stat.st_mtime_ns, reason)
        return self.save(entries)


def verify_images(
    paths: Sequence[str | os.PathLike],
    workers: int = 0,
    cache: ScanCache | None = None,
    verbose: bool = True,
    desc: str = "verifying images",
) -> list[str | None]:
    """Decode every file in ``paths`` (in ``workers`` processes when > 1); return a rejection reason or None each.

    Results whose (path, size, mtime) are in ``cache`` are reused; new results are written back to it. A cache
    that cannot be written is reported (when ``verbose``, which also shows a progress bar) and otherwise ignored.
    """
    reasons: list[str | None] = [None] * len(paths)
    cached = cache.load() if cache else {}
    stats: dict[int, tuple[int, int]] = {}
    todo = []
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError as err:
            reasons[i] = f"unreadable: {err.strerror or err}"
            continue
        stats[i] = (stat.st_size, stat.st_mtime_ns)
        hit = cached.get(cache.key(path)) if cache else None
        if hit is not None and hit[:2] == stats[i]:
            reasons[i] = hit[2]
        else:
            todo.append(i)

    with tqdm(total=len(todo), desc=desc, unit="img", disable=not verbose or not todo) as bar:
        for i, reason in zip(todo, _run_verification([paths[i] for i in todo], workers), strict=True):
            reasons[i] = reason
            bar.update()

    if cache and todo:
        for i, (size, mtime) in stats.items():
            cached[cache.key(paths[i])] = (size, mtime, reasons[i])
        error = cache.save(cached)
        if error and verbose:
            print(f"note: the image scan cache could not be written ({error}); the next start will scan again")
    return reasons


def _run_verification(paths: list, workers: int) -> Iterator[str | None]:
    """Verify ``paths`` in up to ``workers`` processes, no more than the available memory holds."""
    workers = min(workers, len(paths))
    by_memory = memory_workers()
    if workers > 1 and by_memory is not None and by_memory < workers:
        print(f"note: verifying with {by_memory} processes instead of {workers}: the available memory holds "
              f"{by_memory} (each may need {WORKER_MEMORY // 2**20} MB for a large image)", flush=True)
        workers = by_memory
    if workers <= 1:
        yield from map(verify_image, paths)
        return
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(verify_image, paths, chunksize=chunksize)


def _cache_version() -> str:
    """Results depend on the Pillow build and the decompression-bomb limit: a change of either re-verifies."""
    return f"1|pillow={PIL.__version__}|max_pixels={Image.MAX_IMAGE_PIXELS}"
