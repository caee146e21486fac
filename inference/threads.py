"""How many compute threads inference uses, and whether onnxruntime's threads spin: one policy for every engine.

Threads are sized from the cores this process may use (its CPU affinity and its cgroup's ``cpu.max`` quota), not
from ``os.cpu_count()``, which counts every core of the host: in a container limited to 2 CPUs of a 64-core host a
pool of 64 threads time-slices itself to a crawl. ``OMP_NUM_THREADS``, when set, wins (the user or a test runner
decided). Torch-free: the ONNX path imports it.
"""

import os

from data.scan import usable_cpus

SPINNING_KEY = "session.intra_op.allow_spinning"  # onnxruntime session config: "0" lets idle threads sleep


def compute_threads() -> int:
    """Intra-op threads for a model on the CPU: ``OMP_NUM_THREADS`` when set, else :func:`data.scan.usable_cpus`.

    Decoding threads are not subtracted: inference decodes each batch in turns with the model
    (:func:`inference.batching.run_batched`), and where they do overlap (the service) the model's threads yield
    instead of spinning (:func:`onnx_thread_settings`).
    """
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return usable_cpus()


def onnx_thread_settings(decode_threads: int) -> tuple[int, dict[str, str]]:
    """``(intra-op threads, session config entries)`` for an onnxruntime session in a process that also decodes
    images on ``decode_threads`` threads: spinning is off when it does, so a waiting model thread does not hold a
    core a decoder (or a descheduled peer) needs."""
    return compute_threads(), {SPINNING_KEY: "0" if decode_threads > 0 else "1"}
