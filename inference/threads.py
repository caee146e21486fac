"""How many compute threads inference uses, and whether onnxruntime's threads spin: one policy for every engine.

Threads are sized from the cores this process may use (its CPU affinity and its cgroup's ``cpu.max`` quota), not
from ``os.cpu_count()``, which counts every core of the host: in a container limited to 2 CPUs of a 64-core host a
pool of 64 threads time-slices itself to a crawl. ``OMP_NUM_THREADS``, when set, wins (the user or a test runner
decided). Torch-free: the ONNX path imports it.
"""

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1: quota (-1: none) and period
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
SPINNING_KEY = "session.intra_op.allow_spinning"  # onnxruntime session config: "0" lets idle threads sleep


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs the cgroup quota allows (quota / period, e.g. 1.5), or None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(CGROUP_V1_QUOTA.read_text())
        return None if quota <= 0 else quota / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit(cpu_max)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def compute_threads() -> int:
    """Intra-op threads for a model on the CPU: ``OMP_NUM_THREADS`` when set, else :func:`usable_cores`.

    Decoding threads are not subtracted: inference decodes each batch in turns with the model
    (:func:`inference.batching.run_batched`), and where they do overlap (the service) the model's threads yield
    instead of spinning (:func:`onnx_thread_settings`).
    """
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return usable_cores()


def onnx_thread_settings(decode_threads: int) -> tuple[int, dict[str, str]]:
    """``(intra-op threads, session config entries)`` for an onnxruntime session in a process that also decodes
    images on ``decode_threads`` threads: spinning is off when it does, so a waiting model thread does not hold a
    core a decoder (or a descheduled peer) needs."""
    return compute_threads(), {SPINNING_KEY: "0" if decode_threads > 0 else "1"}
