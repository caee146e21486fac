"""Measure inference or training throughput (images/s) and peak memory of LSNet and other timm models.

    python speed.py --model lsnet_t_artist --batch-size 32
    python speed.py --compare lsnet_t_artist,lsnet_t_artist:naive --batch-size 32
    python speed.py --train --compare lsnet_t_artist,efficientvit_m3 --batch-size 16
    python speed.py --model lsnet_t --device cuda --dtype float16 --channels-last --batch-size 2048
    python speed.py --train --amp --dtype float16 --model lsnet_t --device cuda --batch-size 256

An entry is a timm model name with an optional variant tag, ``name:tag``:

* ``fused`` (default): inference on the BatchNorm-fused model (``timm.utils.reparameterize_model``), SKA auto;
* ``compiled``: fused, then ``utils.compile_for_inference`` (torch.compile with Inductor freezing), as
  ``inference_artist.py --compile`` runs it; compiling happens in the warm-up (use ``--warmup`` 1 or more);
* ``unfused``: the model as trained, SKA picked automatically;
* ``naive``: unfused, every SKA replaced by the naive unfold reference (how the original code ran on a CPU);
* ``torch`` / ``triton``: fused, with that SKA implementation forced.

Training ignores fusion and the ``compiled`` tag (the model is in train mode; ``--compile`` compiles every entry)
but honours the SKA implementation of the tag.
The timed repeats of the compared entries are interleaved (A B A B ...), so drift in machine load hits them alike;
each repeat times ``--iters`` steps. The table gives the median, min and max images/s over the repeats and the
ratio of each entry's median to the first entry's.

Peak memory is the memory held by tensors at the worst moment of one step: the entry's own state (weights, buffers,
gradients, optimizer state, input batch) plus the most allocated at once during the step; the latter comes from
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, from replaying the allocation and free events that
``torch.profiler`` records (exact for tensor storage, unlike resident-set size, which depends on the allocator).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

import model  # noqa: F401  (registers the LSNet models with timm)
from model.ska import IMPLS, SKA
from utils import UserError, compile_for_inference, resolve_device, run_cli

__all__ = [
    "VARIANTS",
    "Result",
    "Workload",
    "benchmark",
    "build_model",
    "format_table",
    "get_args_parser",
    "main",
    "make_workload",
    "parse_entry",
    "prepare_model",
    "quiet_stderr",
    "setup",
]

# tag -> (SKA implementation to force or None for the model's default, fuse BatchNorms for inference,
#         compile for inference)
VARIANTS: dict[str, tuple[str | None, bool, bool]] = {
    "fused": (None, True, False),
    "compiled": (None, True, True),
    "unfused": (None, False, False),
    "naive": ("reference", False, False),
    "torch": ("torch", True, False),
    "triton": ("triton", True, False),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIB = 2**20


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "speed", description="Images/s and peak memory of models, inference or training.", add_help=True
    )
    parser.add_argument("--model", default="lsnet_t_artist", help="entry: timm model name with an optional :tag")
    parser.add_argument("--compare", default=None,
                        help="comma-separated entries measured in one run, e.g. lsnet_t_artist,lsnet_t_artist:naive "
                             f"(tags: {', '.join(VARIANTS)}); ratios are to the first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224, help="square input size")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="weights and inputs are cast to it; with --amp, the autocast dtype instead")
    parser.add_argument("--amp", action="store_true", help="float32 weights, autocast to --dtype (mixed precision)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every entry (inference: like the compiled tag, Inductor freezing)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode (reduce-overhead uses CUDA graphs)")
    parser.add_argument("--train", action="store_true",
                        help="time forward + backward + AdamW step (cross-entropy on random labels)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per entry before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per entry")
    parser.add_argument("--iters", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory step")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# --------------------------------------------------------------------------------------------- models


def parse_entry(spec: str) -> tuple[str, str]:
    """``"name[:tag]"`` -> ``(name, tag)``; the tag defaults to ``fused``."""
    name, _, tag = spec.strip().partition(":")
    tag = tag or "fused"
    if tag not in VARIANTS:
        raise UserError(f"unknown variant tag {tag!r} in {spec!r}; use one of {', '.join(VARIANTS)}")
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r} in {spec!r}; use a timm model name such as lsnet_t_artist")
    return name, tag


def set_ska_impl(net: nn.Module, impl: str) -> int:
    """Replace every :class:`model.ska.SKA` module of ``net`` by ``SKA(impl)``; return how many were replaced."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SKA impl {impl!r}, expected one of {IMPLS}")
    slots = [(parent, name) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, SKA)]
    for parent, name in slots:
        setattr(parent, name, SKA(impl))
    return len(slots)


def prepare_model(net: nn.Module, tag: str = "fused", train: bool = False) -> nn.Module:
    """Put ``net`` in train or eval mode, force the SKA implementation of ``tag`` and, for inference, fuse it."""
    impl, fuse, _ = VARIANTS[tag]
    if impl is not None and set_ska_impl(net, impl) == 0:
        raise UserError(f"variant {tag!r} sets the SKA implementation, but the model has no SKA layer")
    net.train(train)
    if fuse and not train:
        reparameterize_model(net, inplace=True)
    return net


def build_model(name: str, tag: str = "fused", train: bool = False, num_classes: int = 1000) -> nn.Module:
    """Create the timm model ``name`` (random weights) and :func:`prepare_model` it for the variant ``tag``."""
    return prepare_model(timm.create_model(name, num_classes=num_classes), tag, train)


# --------------------------------------------------------------------------------------------- workloads


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


def _classification_loss(output: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    outputs = output if isinstance(output, tuple) else (output,)  # distillation models train two heads
    return sum(F.cross_entropy(out.float(), target) for out in outputs) / len(outputs)


def make_workload(spec: str, args: argparse.Namespace, device: torch.device) -> Workload:
    """Build the model of entry ``spec``, its input batch (and optimizer) and the step that :func:`benchmark` times."""
    name, tag = parse_entry(spec)
    dtype = DTYPES[args.dtype]
    weight_dtype = torch.float32 if args.amp else dtype
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    net = build_model(name, tag, args.train, args.num_classes)
    net = net.to(device=device, dtype=weight_dtype, memory_format=memory_format)
    if args.train:
        runner = torch.compile(net, mode=args.compile_mode) if args.compile else net
    elif VARIANTS[tag][2] or args.compile:
        runner = compile_for_inference(net) if args.compile_mode is None else torch.compile(net, mode=args.compile_mode)
    else:
        runner = net
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device, dtype=weight_dtype)
    x = x.contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.amp)
    label = spec.strip()
    if not args.train:

        def infer() -> None:
            with torch.inference_mode(), autocast:
                runner(x)

        return Workload(label, infer, args.batch_size, args.iters, lambda: (x, *net.parameters(), *net.buffers()),
                        args.memory)

    target = torch.randint(args.num_classes, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.025)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and dtype == torch.float16)

    def state() -> Iterator[torch.Tensor]:
        yield from (x, target, *net.parameters(), *net.buffers())
        yield from (p.grad for p in net.parameters() if p.grad is not None)
        for per_param in optimizer.state.values():
            yield from (v for v in per_param.values() if isinstance(v, torch.Tensor))

    def train_step() -> None:
        with autocast:
            loss = _classification_loss(runner(x), target)
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as in a training loop
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return Workload(label, train_step, args.batch_size, args.iters, state, args.memory)


# --------------------------------------------------------------------------------------------- measuring


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(tensors: Iterable[torch.Tensor]) -> int:
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


@dataclass
class Result:
    """Images/s of every timed repeat of one workload, and its peak memory in bytes (None when not measured)."""

    label: str
    images_per_s: list[float]
    peak_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)


def benchmark(workloads: Sequence[Workload], device: torch.device, repeats: int = 10, warmup: int = 3) -> list[Result]:
    """Warm up every workload, time ``repeats`` rounds of them interleaved, then measure peak memory."""
    for workload in workloads:
        for _ in range(warmup):
            workload.run()
    _synchronize(device)
    rates: list[list[float]] = [[] for _ in workloads]
    for _ in range(repeats):
        for workload, rate in zip(workloads, rates, strict=True):
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(workload.steps):
                workload.run()
            _synchronize(device)
            rate.append(workload.images * workload.steps / (time.perf_counter() - start))
    results = [Result(w.label, r) for w, r in zip(workloads, rates, strict=True)]
    for workload, result in zip(workloads, results, strict=True):
        if workload.memory:
            transient = transient_peak_bytes(workload.run, device)
            result.peak_bytes = _state_bytes(workload.state()) + transient
    return results


def memory_method(device: torch.device) -> str:
    source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation replay"
    return f"peak memory = own state (weights, buffers, grads, optimizer state, inputs) + transient peak ({source})"


def format_table(results: Sequence[Result]) -> str:
    """Markdown table: entry, images/s median/min/max, peak memory and the ratio of medians to the first entry."""
    lines = ["| entry | img/s median | img/s min | img/s max | peak memory MiB | ratio to first |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        memory = "-" if r.peak_bytes is None else f"{r.peak_bytes / MIB:.1f}"
        lines.append(f"| {r.label} | {r.median:.1f} | {min(r.images_per_s):.1f} | {max(r.images_per_s):.1f} "
                     f"| {memory} | {r.median / results[0].median:.2f}x |")
    return "\n".join(lines)


def describe_run(args: argparse.Namespace, device: torch.device) -> str:
    mode = "training step (forward + backward + AdamW)" if args.train else "inference"
    precision = f"amp {args.dtype}" if args.amp else args.dtype
    extras = [flag for flag, on in (("channels-last", args.channels_last), ("compiled", args.compile)) if on]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return (f"{mode}, batch {args.batch_size} at {args.resolution}, {device} ({where}), {precision}"
            f"{''.join(', ' + e for e in extras)}, torch {torch.__version__}; median of {args.repeats} repeats of "
            f"{args.iters} step(s) after {args.warmup} warm-up, entries interleaved")


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "resolution", "num_classes", "repeats", "iters"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.amp and args.dtype == "float32":
        raise UserError("--amp autocasts to --dtype: pass --dtype float16 or bfloat16 with it")
    if args.train and args.dtype != "float32" and not args.amp:
        raise UserError(f"training with {args.dtype} weights is not supported; add --amp for mixed precision")
    if args.compile_mode and not args.compile:
        args.compile = True


def setup(args: argparse.Namespace) -> tuple[torch.device, list[Workload]]:
    """Check ``args`` and build the workload of every entry (``--compare``, else ``--model``) on its device."""
    check_args(args)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    specs = [s for s in (args.compare or args.model).split(",") if s.strip()]
    if not specs:
        raise UserError("no entries to measure: pass --model NAME or --compare NAME,NAME[:tag],...")
    return device, [make_workload(spec, args, device) for spec in specs]


def main(args: argparse.Namespace | None = None) -> list[Result]:
    """Run the benchmark described by ``args`` (parsed from the command line when None) and print the table."""
    args = args if args is not None else get_args_parser().parse_args()
    device, workloads = setup(args)
    print(describe_run(args, device))
    results = benchmark(workloads, device, args.repeats, args.warmup)
    print(format_table(results))
    if args.memory:
        print(memory_method(device))
    return results


if __name__ == "__main__":
    run_cli(main)
