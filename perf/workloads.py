"""The speed benchmark's settings (``speed.py``'s flags, defined once here) and the workloads they describe:
inference or a training step (forward + backward + AdamW) of each entry, on random inputs."""

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, compile_for_inference, resolve_device

from .benchmark import Workload
from .models import VARIANTS, build_model, parse_entry

__all__ = ["DTYPES", "SpeedSettings", "add_speed_args", "describe_run", "make_workload", "parse_speed_args", "setup"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_speed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of ``speed.py`` to ``parser`` and return it."""
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


@dataclass(frozen=True)
class SpeedSettings:
    """What to measure and how; built once from the flags by :meth:`from_args`."""

    entries: tuple[str, ...]
    batch_size: int
    resolution: int
    num_classes: int
    device: str
    dtype: str
    amp: bool
    channels_last: bool
    compile: bool
    compile_mode: str | None
    train: bool
    warmup: int
    repeats: int
    iters: int
    memory: bool
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SpeedSettings":
        """Check the parsed flags (one-line UserErrors) and build the settings; ``--compile-mode`` implies compiling."""
        for name in ("batch_size", "resolution", "num_classes", "repeats", "iters"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
        if args.amp and args.dtype == "float32":
            raise UserError("--amp autocasts to --dtype: pass --dtype float16 or bfloat16 with it")
        if args.train and args.dtype != "float32" and not args.amp:
            raise UserError(f"training with {args.dtype} weights is not supported; add --amp for mixed precision")
        entries = tuple(s.strip() for s in (args.compare or args.model).split(",") if s.strip())
        if not entries:
            raise UserError("no entries to measure: pass --model NAME or --compare NAME,NAME[:tag],...")
        fields = ("batch_size", "resolution", "num_classes", "device", "dtype", "amp", "channels_last",
                  "compile_mode", "train", "warmup", "repeats", "iters", "memory", "seed")
        return cls(entries=entries, compile=args.compile or args.compile_mode is not None,
                   **{name: getattr(args, name) for name in fields})


def parse_speed_args(argv: Sequence[str]) -> SpeedSettings:
    """The settings of the command ``python speed.py ARGV``."""
    return SpeedSettings.from_args(add_speed_args(argparse.ArgumentParser("speed")).parse_args(list(argv)))


def _classification_loss(output: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    outputs = output if isinstance(output, tuple) else (output,)  # distillation models train two heads
    return sum(F.cross_entropy(out.float(), target) for out in outputs) / len(outputs)


def _train_workload(label: str, net: nn.Module, runner: nn.Module, x: torch.Tensor, settings: SpeedSettings,
                    autocast: torch.autocast) -> Workload:
    """A training step: forward, cross-entropy on random labels, backward and an AdamW step."""
    target = torch.randint(settings.num_classes, (settings.batch_size,), device=x.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.025)
    scaler = torch.amp.GradScaler(x.device.type, enabled=settings.amp and settings.dtype == "float16")

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

    return Workload(label, train_step, settings.batch_size, settings.iters, state, settings.memory)


def _runner(net: nn.Module, tag: str, settings: SpeedSettings) -> nn.Module:
    """What a step calls: ``net`` itself or its compiled form."""
    if settings.train:
        return torch.compile(net, mode=settings.compile_mode) if settings.compile else net
    if VARIANTS[tag][2] or settings.compile:
        if settings.compile_mode is None:
            return compile_for_inference(net)
        return torch.compile(net, mode=settings.compile_mode)
    return net


def make_workload(spec: str, settings: SpeedSettings, device: torch.device) -> Workload:
    """Build the model of entry ``spec``, its input batch (and optimizer) and the step that ``benchmark`` times."""
    name, tag = parse_entry(spec)
    dtype = DTYPES[settings.dtype]
    weight_dtype = torch.float32 if settings.amp else dtype
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    torch.manual_seed(settings.seed)
    net = build_model(name, tag, settings.train, settings.num_classes)
    net = net.to(device=device, dtype=weight_dtype, memory_format=memory_format)
    runner = _runner(net, tag, settings)
    x = torch.randn(settings.batch_size, 3, settings.resolution, settings.resolution, device=device,
                    dtype=weight_dtype).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=settings.amp)
    if settings.train:
        return _train_workload(spec.strip(), net, runner, x, settings, autocast)

    def infer() -> None:
        with torch.inference_mode(), autocast:
            runner(x)

    return Workload(spec.strip(), infer, settings.batch_size, settings.iters,
                    lambda: (x, *net.parameters(), *net.buffers()), settings.memory)


def describe_run(settings: SpeedSettings, device: torch.device) -> str:
    """One line: what is timed, batch, device, precision and how the repeats are taken."""
    mode = "training step (forward + backward + AdamW)" if settings.train else "inference"
    precision = f"amp {settings.dtype}" if settings.amp else settings.dtype
    extras = [flag for flag, on in (("channels-last", settings.channels_last), ("compiled", settings.compile)) if on]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return (f"{mode}, batch {settings.batch_size} at {settings.resolution}, {device} ({where}), {precision}"
            f"{''.join(', ' + e for e in extras)}, torch {torch.__version__}; median of {settings.repeats} repeats "
            f"of {settings.iters} step(s) after {settings.warmup} warm-up, entries interleaved")


def setup(settings: SpeedSettings) -> tuple[torch.device, list[Workload]]:
    """Resolve the device and build the workload of every entry on it."""
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device, [make_workload(spec, settings, device) for spec in settings.entries]
