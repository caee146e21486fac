"""Benchmark the SKA implementations on a typical LSNet layer (N=32, C=256, 14x14, k=3, G=C/8 by default).

    python bench/bench_ska.py [--device cpu] [--dtype float32] [--repeats 10] [--output bench.md]

Times are medians over ``--repeats`` runs after warm-up. Peak memory is the most memory held at once by tensors
allocated during one call, on top of the inputs that already exist: on CUDA from the caching allocator's statistics
(``torch.cuda.max_memory_allocated``), on CPU by replaying every allocation and free that ``torch.profiler`` records
with ``profile_memory=True`` in time order and taking the maximum of the running total. The CPU figure is exact for
tensor storage and independent of how the C allocator caches or returns memory (resident-set size is not); on the
default layer it agreed within 0.1 MiB with the growth of the resident-set high-water mark (Linux VmHWM, reset
before each call, with glibc's mmap threshold pinned so that freed blocks go back to the OS).
"""

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.ska import HAS_TRITON, ska
from perf.benchmark import MIB
from perf.probes import synchronize, transient_peak_bytes
from utils import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    layer = parser.add_argument_group("the SKA layer",
                                      "x (batch, channels, size, size), w (batch, groups, kernel^2, size, size)")
    layer.add_argument("--batch", type=int, default=32)
    layer.add_argument("--channels", type=int, default=256)
    layer.add_argument("--size", type=int, default=14, help="height and width")
    layer.add_argument("--kernel", type=int, default=3)
    layer.add_argument("--groups", type=int, default=None, help="weight groups G (default: channels // 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to append the table to")
    return parser


def median_ms(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function; the functions take turns so that load changes hit them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    args = get_args_parser().parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n, c, size, k = args.batch, args.channels, args.size, args.kernel
    groups = args.groups or c // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=gen).to(device, dtype)
    w = torch.randn(n, groups, k * k, size, size, generator=gen).to(device, dtype)
    grad = torch.randn(n, c, size, size, generator=gen).to(device, dtype)
    x_req, w_req = x.clone().requires_grad_(), w.clone().requires_grad_()

    impls = ["reference", "torch"] + (["triton"] if device.type == "cuda" and HAS_TRITON else [])

    def forward(impl: str) -> None:
        with torch.no_grad():
            ska(x, w, impl)

    def forward_backward(impl: str) -> None:
        torch.autograd.grad(ska(x_req, w_req, impl), (x_req, w_req), grad)

    results = {impl: {} for impl in impls}
    for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        calls = {impl: functools.partial(fn, impl) for impl in impls}
        for impl, ms in median_ms(calls, device, args.repeats, args.warmup).items():
            results[impl][f"{mode}_ms"] = ms
        for impl, call in calls.items():
            results[impl][f"{mode}_mib"] = transient_peak_bytes(call, device) / MIB

    ref = results["reference"]
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation replay"
    lines = [
        f"SKA x=({n}, {c}, {size}, {size}) w=({n}, {groups}, {k * k}, {size}, {size}) {args.dtype} on {device} "
        f"({torch.get_num_threads()} threads, {platform.machine()}), torch {torch.__version__}; "
        f"median of {args.repeats} after {args.warmup} warm-up; peak memory above the inputs ({memory}); "
        "forward under no_grad, forward+backward returns grads for x and w",
        "",
        "| impl | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up | fwd peak MiB (ratio) "
        "| fwd+bwd peak MiB (ratio) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for impl, r in results.items():
        lines.append(
            f"| {impl} | {r['fwd_ms']:.2f} | {ref['fwd_ms'] / r['fwd_ms']:.1f}x | {r['fwdbwd_ms']:.2f} "
            f"| {ref['fwdbwd_ms'] / r['fwdbwd_ms']:.1f}x | {r['fwd_mib']:.1f} ({r['fwd_mib'] / ref['fwd_mib']:.3f}) "
            f"| {r['fwdbwd_mib']:.1f} ({r['fwdbwd_mib'] / ref['fwdbwd_mib']:.3f}) |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        with args.output.open("a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    run_cli(main)
