"""How many compute threads inference uses, and whether onnxruntime's threads spin: one policy for every engine.

Threads are sized from the cores this process may use (its CPU affinity and its cgroup's ``cpu.max`` quota), not
from ``os.cpu_count()``, which counts every core of the host: in a container limited to 2 CPUs of a 64-core host a
pool of 64 threads time-slices itself to a crawl. ``OMP_NUM_THREADS``, when set, wins (the user or a test runner
decided). Torch-free: the ONNX path imports it.

An onnxruntime model that decodes images beside it runs in *lanes*: up to :data:`MAX_LANES` batches at once, each on
its own thread doing the whole batch (decode, resize, normalise, the session call on ``cores // lanes`` intra-op
threads). A lane never waits for a peer: no spinning, no barrier between the model's threads, and one lane's decoding
or Python work overlaps another lane's model call, so every core stays busy without oversubscribing them.
"""

import os

from data.scan import usable_cpus

SPINNING_KEY = "session.intra_op.allow_spinning"  # onnxruntime session config: "0" lets idle threads sleep
MAX_LANES = 4  # more batches at once only add memory (activations, decoded images) once each has a core


def compute_threads() -> int:
    """Intra-op threads for a model on the CPU: ``OMP_NUM_THREADS`` when set, else :func:`data.scan.usable_cpus`.

    PyTorch decodes each batch in turns with the model (:func:`inference.batching.run_batched`); onnxruntime runs in
    lanes (:func:`onnx_thread_settings`).
    """
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return usable_cpus()


def onnx_lanes(decode_threads: int) -> int:
    """Batches an onnxruntime model runs at once in a process that decodes images on ``decode_threads`` threads:
    one per core (at most :data:`MAX_LANES`); one when nothing is decoded beside it (the model alone)."""
    return min(compute_threads(), MAX_LANES) if decode_threads > 0 else 1


def onnx_thread_settings(decode_threads: int) -> tuple[int, dict[str, str]]:
    """``(intra-op threads, session config entries)`` for an onnxruntime session in a process that also decodes
    images on ``decode_threads`` threads: the cores shared among :func:`onnx_lanes` lanes, spinning off (a waiting
    thread would hold a core a lane needs); the model alone spins on all cores."""
    lanes = onnx_lanes(decode_threads)
    return max(1, compute_threads() // lanes), {SPINNING_KEY: "0" if decode_threads > 0 else "1"}
