"""Timing and memory probes: device synchronisation, the bytes held by tensors, and the transient memory peak of a call.

The transient peak is the most memory allocated at once during a call beyond what was alive before it: from
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, from replaying the allocation and free events that
``torch.profiler`` records (exact for tensor storage, unlike resident-set size, which depends on the allocator).
"""

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["memory_method", "quiet_stderr", "state_bytes", "synchronize", "transient_peak_bytes"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side may log start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def transient_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Most bytes allocated at once by ``fn()`` beyond what was alive before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def memory_method(device: torch.device) -> str:
    """One line saying how peak memory is measured on ``device``."""
    source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation replay"
    return f"peak memory = own state (weights, buffers, grads, optimizer state, inputs) + transient peak ({source})"
