"""Time workloads in interleaved repeats (A B A B ...), so that drift in machine load hits them alike, and measure
their peak memory: the tensors a workload keeps alive plus the transient peak of one step."""

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .probes import state_bytes, synchronize, transient_peak_bytes

__all__ = ["MIB", "Result", "Workload", "benchmark", "format_table"]

MIB = 2**20


@dataclass
class Workload:
    """Something to time: each ``run()`` processes ``images`` images and a timed repeat calls it ``steps`` times;
    ``state()`` yields the tensors it keeps alive between calls."""

    label: str
    run: Callable[[], object]
    images: int
    steps: int = 1
    state: Callable[[], Iterable[torch.Tensor]] = tuple
    memory: bool = True


@dataclass
class Result:
    """Images/s of every timed repeat of one workload, and its peak memory in bytes (None when not measured)."""

    label: str
    images_per_s: list[float]
    peak_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)


def _time_steps(workload: Workload, device: torch.device) -> float:
    """Images/s of one timed repeat of ``workload``."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(workload.steps):
        workload.run()
    synchronize(device)
    return workload.images * workload.steps / (time.perf_counter() - start)


def benchmark(workloads: Sequence[Workload], device: torch.device, repeats: int = 10, warmup: int = 3) -> list[Result]:
    """Warm up every workload, time ``repeats`` rounds of them interleaved, then measure peak memory."""
    for workload in workloads:
        for _ in range(warmup):
            workload.run()
    synchronize(device)
    results = [Result(w.label, []) for w in workloads]
    for _ in range(repeats):
        for workload, result in zip(workloads, results, strict=True):
            result.images_per_s.append(_time_steps(workload, device))
    for workload, result in zip(workloads, results, strict=True):
        if workload.memory:
            transient = transient_peak_bytes(workload.run, device)
            result.peak_bytes = state_bytes(workload.state()) + transient
    return results


def format_table(results: Sequence[Result]) -> str:
    """Markdown table: entry, images/s median/min/max, peak memory and the ratio of medians to the first entry."""
    lines = ["| entry | img/s median | img/s min | img/s max | peak memory MiB | ratio to first |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        memory = "-" if r.peak_bytes is None else f"{r.peak_bytes / MIB:.1f}"
        lines.append(f"| {r.label} | {r.median:.1f} | {min(r.images_per_s):.1f} | {max(r.images_per_s):.1f} "
                     f"| {memory} | {r.median / results[0].median:.2f}x |")
    return "\n".join(lines)
