"""Run the standard benchmark set (the performance targets) and write it as a markdown report.

    python bench/run_bench.py --output bench/results.md          # `make bench`: CPU, float32, under 10 minutes
    python bench/run_bench.py --gpu --output bench/results.md    # also the GPU rows (needs CUDA)

Targets, each a ratio of two figures measured in the same run (medians of interleaved repeats):

1. SKA forward and forward+backward vs the naive unfold reference, and peak memory (``bench/bench_ska.py``).
2. ``lsnet_t_artist`` inference, batch 32 at 224: fused model with the fast SKA, compiled (``--compile``), vs the
   unfused model with the naive unfold SKA (how the original code ran on a CPU); the eager fused model is reported
   alongside.
3. ``lsnet_t_artist`` training step, batch 16 at 224, vs timm's ``efficientvit_m3`` (similar FLOPs).
4. Inference over a directory of JPEG files with ``predictor.ArtistModel.run_directory`` (decode + preprocess +
   model) vs the model alone at the same batch size, compiled and not; timed interleaved with target 2.

The model table gives params, GFLOPs at 224 (``flops.py``) and CPU images/s of LSNet-T/S/B.
"""

import argparse
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.profiler import ProfilerActivity, profile

from data.class_mapping import write_class_mapping
from data.images import load_image
from model.ska import HAS_TRITON
from perf.benchmark import Result, Workload, benchmark, format_table
from perf.flop_count import count_flops, count_params
from perf.models import build_model
from perf.probes import memory_method, quiet_stderr
from perf.report import Row, parse_markdown_table, spread
from perf.workloads import describe_run, parse_speed_args, setup
from predictor import ArtistModel, add_runtime_args, load_model_bundle
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "lsnet_t_artist"
PAPER_GPU_IMAGES_PER_S = {"lsnet_t": 14708, "lsnet_s": 9023, "lsnet_b": 3996}  # RTX 3090, batch 2048, fp16
PAPER_GFLOPS = {"lsnet_t": 0.3, "lsnet_s": 0.5, "lsnet_b": 1.3}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("run_bench", description="Run the benchmark targets and write the report.")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per entry (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per entry before timing")
    parser.add_argument("--images", type=int, default=256, help="JPEG files for the directory-inference target")
    workers = add_runtime_args(argparse.ArgumentParser()).get_default("num_workers")
    parser.add_argument("--workers", type=int, default=workers,
                        help="image-decoding workers for directory inference (default: inference_artist.py's, "
                             "%(default)s here)")
    parser.add_argument("--gpu", action="store_true", help="also measure the GPU rows (CUDA device required)")
    return parser


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- target 1


def ska_targets() -> tuple[list[Row], str]:
    """Run bench/bench_ska.py (the SKA micro-benchmark) and turn its table into target-1 rows."""
    command = ["bench/bench_ska.py"]
    out = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    table = parse_markdown_table(out)
    ref, fast = table["reference"], table["torch"]

    def value(row: dict[str, str], column: str) -> float:
        """The leading number of the cell under the header that starts with ``column`` (e.g. "26.0 (0.115)")."""
        cell = next(text for header, text in row.items() if header.startswith(column))
        return float(re.match(r"[-+0-9.eE]+", cell).group())

    shown = "python " + " ".join(command)
    rows = []
    for label, column in (("forward", "fwd ms"), ("forward+backward", "fwd+bwd ms")):
        ratio = value(ref, column) / value(fast, column)
        rows.append(Row("1", f"SKA {label} speed, portable path vs unfold reference (N=32, C=256, 14x14, k=3)",
                        f"{value(fast, column):.2f} ms vs {value(ref, column):.2f} ms", ratio, 3.0, shown))
    column = "fwd+bwd peak MiB"
    rows.append(Row("1", "SKA forward+backward peak memory, portable path / unfold reference",
                    f"{value(fast, column):.1f} MiB vs {value(ref, column):.1f} MiB",
                    value(fast, column) / value(ref, column), 1 / 3, shown, at_most=True))
    return rows, out.strip()


# --------------------------------------------------------------------------------------------- targets 2-4


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEG files of random sizes 256-512 px: smooth colour fields with grain (photo-like entropy)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = (int(v) for v in rng.integers(256, 513, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0.0, 12.0, size=smooth.shape)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def load_bundle(model_dir: Path, num_classes: int = 1000, compile: bool = False) -> ArtistModel:
    """Save a random-weight ``lsnet_t_artist`` model folder (once) and load it with the predictor's public API."""
    if not (model_dir / "checkpoint.pth").exists():
        torch.manual_seed(0)
        net = timm.create_model(MODEL, num_classes=num_classes)
        torch.save({"model": net.state_dict(), "args": {"model": MODEL}}, model_dir / "checkpoint.pth")
        write_class_mapping(model_dir / "class_mapping.csv", [f"artist_{i}" for i in range(num_classes)])
    return load_model_bundle(model_dir, device="cpu", compile=compile)


def directory_workload(bundle: ArtistModel, image_dir: Path, batch_size: int, workers: int,
                       label: str) -> Workload:
    """Classify every image of ``image_dir`` with ``bundle.run_directory`` (decode + preprocess + model)."""
    count = len(list(image_dir.glob("*.jpg")))

    def run() -> None:
        result = bundle.run_directory(image_dir, batch_size=batch_size, num_workers=workers)
        if len(result.names) != count:
            raise RuntimeError(f"directory inference returned {len(result.names)} of {count} images")

    return Workload(label, run, count, memory=False)


def preprocess_cpu_ms(bundle: ArtistModel, image_dir: Path) -> float:
    """CPU milliseconds per image to decode and preprocess ``image_dir``'s JPEGs with one thread, like a worker."""
    paths = sorted(image_dir.glob("*.jpg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run with one thread
    try:
        start = time.process_time()
        for path in paths:
            bundle.transform(load_image(path))
        return (time.process_time() - start) / len(paths) * 1e3
    finally:
        torch.set_num_threads(threads)


def convolution_share(net: nn.Module, x: torch.Tensor) -> float:
    """Fraction of the CPU time of ``net(x)`` spent in convolution kernels (one profiled call after a warm-up)."""
    with torch.inference_mode():
        net(x)
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            net(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / total


def speed_command(argv: list[str]) -> str:
    return "python speed.py " + " ".join(argv)


def inference_targets(args: argparse.Namespace, start: float) -> tuple[list[Row], str]:
    """Targets 2 and 4, timed in one interleaved run: the compiled and the eager fused fast model, the naive unfused
    model, the unfused fast model (to split the gains) and directory inference with the compiled and the eager
    model."""
    batch = 32
    # Each repeat of the models processes as many images as one directory run, so load bursts weigh on all alike.
    steps = math.ceil(args.images / batch)
    argv = ["--compare", f"{MODEL}:compiled,{MODEL}:naive,{MODEL},{MODEL}:unfused", "--batch-size", str(batch),
            "--resolution", "224", "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--iters",
            str(steps)]
    settings = parse_speed_args(argv)
    device, workloads = setup(settings)
    with tempfile.TemporaryDirectory(prefix="lsnet_bench_") as tmp:
        image_dir, model_dir = Path(tmp) / "images", Path(tmp) / "model"
        image_dir.mkdir()
        model_dir.mkdir()
        write_jpegs(image_dir, args.images)
        log(f"wrote {args.images} JPEG files; timing targets 2 and 4 (the first runs compile)", start)
        bundles = {kind: load_bundle(model_dir, compile=kind == "compiled") for kind in ("compiled", "fused")}
        workloads += [directory_workload(bundle, image_dir, batch, args.workers,
                                         f"directory inference, {kind} model (predictor: decode + preprocess + model)")
                      for kind, bundle in bundles.items()]
        results = benchmark(workloads, device, args.repeats, args.warmup)
        load_ms = preprocess_cpu_ms(bundles["fused"], image_dir)
    compiled, naive, fused, unfused, directory_compiled, directory_fused = results
    share = convolution_share(build_model(MODEL), torch.randn(batch, 3, 224, 224))
    threads = torch.get_num_threads()

    def loading_bound(model: Result) -> str:
        model_ms = threads * 1e3 / model.median
        return (f"decoding and preprocessing take {load_ms:.1f} ms of CPU per image and the model {model_ms:.1f} ms "
                f"({threads} threads x {1e3 / model.median:.1f} ms); the {threads} cores are shared by both, so "
                f"even perfect overlap gives at most {model_ms / (model_ms + load_ms):.2f}")

    directory = f"directory of {args.images} JPEGs (256-512 px) through `predictor` ({args.workers} decoding threads)"
    rows = [
        Row("2", f"`{MODEL}` inference, batch {batch} at 224: fused + fast SKA + `--compile` vs unfused + naive "
                 f"unfold SKA (without `--compile`: {fused.median / naive.median:.2f}x)",
            f"{compiled.median:.1f} vs {naive.median:.1f} img/s", compiled.median / naive.median, 2.0,
            speed_command(argv), spread=spread(compiled, naive),
            why=f"the fast SKA makes the unfused model {unfused.median / naive.median:.2f}x faster, BatchNorm "
                f"fusion adds {fused.median / unfused.median:.2f}x and compiling "
                f"{compiled.median / fused.median:.2f}x; "
                f"the rest is convolutions, which all variants run alike ({share:.0%} of the fused model's CPU "
                "time in a profile of the same run)"),
        Row("4", f"{directory}, batch {batch}, compiled model, vs the compiled model alone in the same rounds",
            f"{directory_compiled.median:.1f} vs {compiled.median:.1f} img/s",
            directory_compiled.median / compiled.median, 0.8, "python bench/run_bench.py",
            spread=spread(compiled, directory_compiled), why=loading_bound(compiled)),
        Row("4", f"{directory}, batch {batch}, model not compiled, vs that model alone in the same rounds",
            f"{directory_fused.median:.1f} vs {fused.median:.1f} img/s", directory_fused.median / fused.median, 0.8,
            "python bench/run_bench.py", spread=spread(fused, directory_fused), why=loading_bound(fused)),
    ]
    raw = f"{describe_run(settings, device)}\n\n{format_table(results)}\n\n{memory_method(device)}"
    return rows, raw


def training_target(args: argparse.Namespace) -> tuple[list[Row], str]:
    """Target 3: training steps of lsnet_t_artist vs efficientvit_m3, interleaved."""
    argv = ["--train", "--compare", f"{MODEL},efficientvit_m3", "--batch-size", "16", "--resolution", "224",
            "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--iters", "4"]
    results, raw = run_speed(argv)
    ours, theirs = results
    x = torch.randn(1, 3, 224, 224)
    our_flops, their_flops = (count_flops(timm.create_model(name).eval(), (x,)).total() / 1e9
                              for name in (MODEL, "efficientvit_m3"))
    row = Row("3", f"`{MODEL}` training step (AdamW), batch 16 at 224, vs timm `efficientvit_m3`",
              f"{ours.median:.1f} vs {theirs.median:.1f} img/s", ours.median / theirs.median, 1.0,
              speed_command(argv), spread=spread(ours, theirs),
              why=f"`{MODEL}` has {our_flops / their_flops:.2f}x the FLOPs of `efficientvit_m3` ({our_flops:.3f} vs "
                  f"{their_flops:.3f} GFLOPs, flops.py); per FLOP it trains at "
                  f"{ours.median * our_flops / (theirs.median * their_flops):.2f}x the speed of `efficientvit_m3`")
    return [row], raw


def run_speed(argv: list[str]) -> tuple[list[Result], str]:
    """Run speed.py's benchmark for the command-line arguments ``argv``; return the results and the printed text."""
    settings = parse_speed_args(argv)
    device, workloads = setup(settings)
    results = benchmark(workloads, device, settings.repeats, settings.warmup)
    text = describe_run(settings, device) + "\n\n" + format_table(results)
    if settings.memory:
        text += "\n\n" + memory_method(device)
    return results, text


# --------------------------------------------------------------------------------------------- model table


def model_table(args: argparse.Namespace) -> tuple[str, str]:
    """Params, GFLOPs at 224 and CPU images/s (batch 32, fused, float32) of LSNet-T/S/B."""
    names = list(PAPER_GFLOPS)
    argv = ["--compare", ",".join(names), "--batch-size", "32", "--resolution", "224", "--warmup",
            str(args.warmup), "--repeats", str(args.repeats), "--iters", "4", "--no-memory"]
    results, raw = run_speed(argv)
    lines = ["| model | params (M) | GFLOPs at 224 (paper) | CPU img/s, batch 32, fused, float32 (min-max) |",
             "|---|---:|---:|---:|"]
    for name, result in zip(names, results, strict=True):
        net = timm.create_model(name).eval()
        gflops = count_flops(net, (torch.randn(1, 3, 224, 224),)).total() / 1e9
        lines.append(f"| {name} | {count_params(net) / 1e6:.2f} | {gflops:.2f} ({PAPER_GFLOPS[name]}) "
                     f"| {result.median:.1f} ({min(result.images_per_s):.1f}-{max(result.images_per_s):.1f}) |")
    lines += ["", f"Command: `{speed_command(argv)}`; GFLOPs: `python flops.py --model {' '.join(names)}`."]
    return "\n".join(lines), raw


# --------------------------------------------------------------------------------------------- GPU


GPU_COMMANDS = {
    "inference": ["--compare", "lsnet_t,lsnet_s,lsnet_b", "--device", "cuda", "--dtype", "float16",
                  "--channels-last", "--batch-size", "2048", "--warmup", "5", "--repeats", "20", "--iters", "5"],
    "ska": ["--compare", "lsnet_t:triton,lsnet_t:torch", "--device", "cuda", "--dtype", "float16",
            "--channels-last", "--batch-size", "2048", "--warmup", "5", "--repeats", "20", "--iters", "5"],
    "training": ["--train", "--amp", "--dtype", "float16", "--compare", "lsnet_t_artist,efficientvit_m3",
                 "--device", "cuda", "--channels-last", "--batch-size", "256", "--warmup", "5", "--repeats", "10"],
}


def gpu_section(measure: bool) -> str:
    """The GPU table: measured with ``--gpu``, else the rows marked as not measured, with their commands."""
    lines = ["## GPU", ""]
    if not measure:
        lines += [
            "**Not measured in this session** (no CUDA device). On a GPU machine run "
            "`python bench/run_bench.py --gpu --output bench/results.md`, or the commands below one by one.",
            "",
            "| measurement | GPU | result | paper (RTX 3090) | command |",
            "|---|---|---|---|---|",
        ]
        for name, paper in PAPER_GPU_IMAGES_PER_S.items():
            lines.append(f"| `{name}` inference, batch 2048, float16 | not measured in this session | - "
                         f"| {paper} img/s | `{speed_command(GPU_COMMANDS['inference'])}` |")
        lines.append("| Triton vs portable SKA in `lsnet_t` | not measured in this session | - | - "
                     f"| `{speed_command(GPU_COMMANDS['ska'])}` |")
        lines.append("| training, `--amp` float16, batch 256: img/s and peak memory | not measured in this session | - "
                     f"| - | `{speed_command(GPU_COMMANDS['training'])}` |")
        return "\n".join(lines)
    gpu = torch.cuda.get_device_name()
    lines += [f"Measured on {gpu}; paper: {', '.join(f'{k} {v}' for k, v in PAPER_GPU_IMAGES_PER_S.items())} img/s "
              "on an RTX 3090.", ""]
    for name, argv in GPU_COMMANDS.items():
        if name == "ska" and not HAS_TRITON:
            lines += [f"### {name}", "", "Skipped: the triton package is not installed.", ""]
            continue
        _, raw = run_speed(argv)
        lines += [f"### {name}", "", f"`{speed_command(argv)}`", "", raw, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor() or platform.machine()


def environment(load_before: float) -> str:
    """Date, CPU, thread count, library versions, and the 1-minute load average before and after the run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; CPU: {cpu_model()} ({cores} cores available, "
            f"torch uses {torch.get_num_threads()} threads; load average {load_before:.1f} before the run, "
            f"{os.getloadavg()[0]:.1f} after); torch {torch.__version__}, timm {timm.__version__}, "
            f"Python {platform.python_version()}")


def render_report(args: argparse.Namespace, rows: list[Row], sections: dict[str, str], header: str) -> str:
    """The markdown report: the targets table, the misses explained, the model table, the GPU section and the raw
    output of every measurement (``sections``: "ska", "inference", "training", "models", "models raw", "gpu")."""
    return "\n".join([
        "# Benchmark results",
        "",
        header,
        "",
        "Every ratio compares two figures measured in the same run: medians of interleaved repeats "
        f"({args.repeats} repeats after {args.warmup} warm-up, steps per repeat as in each command; SKA: "
        "bench_ska.py's own defaults). CPU, float32. "
        "A load average above the core count means other processes competed for the CPU during the run: "
        "absolute figures then drop and even the ratios become unreliable (compare min and max in the raw output).",
        "",
        "## Targets",
        "",
        "| # | target | measured | ratio | required | result | command |",
        "|---|---|---|---:|---:|---|---|",
        *(row.markdown() for row in rows),
        "",
        *(f"- Target {row.target} missed by {abs(row.ratio / row.required - 1):.0%}: {row.why}." for row in rows
          if not row.passed and row.reliable and row.why),
        "",
        "## Models (CPU)",
        "",
        sections["models"],
        "",
        sections["gpu"],
        "",
        "## Raw output",
        "",
        "### Target 1: `python bench/bench_ska.py`",
        "",
        sections["ska"],
        "",
        "### Targets 2 and 4",
        "",
        sections["inference"],
        "",
        "### Target 3",
        "",
        sections["training"],
        "",
        "### Models",
        "",
        sections["models raw"],
        "",
    ])


def measure(args: argparse.Namespace, start: float) -> tuple[list[Row], dict[str, str]]:
    """Run every target and the model table (and the GPU rows with ``--gpu``): the target rows, in target order, and
    the report sections of :func:`render_report`."""
    sections = {}
    log("target 1: bench/bench_ska.py", start)
    rows, sections["ska"] = ska_targets()
    log("targets 2 and 4: inference and directory inference", start)
    inference_rows, sections["inference"] = inference_targets(args, start)
    log("target 3: training", start)
    training_rows, sections["training"] = training_target(args)
    log("model table", start)
    sections["models"], sections["models raw"] = model_table(args)
    sections["gpu"] = gpu_section(args.gpu)
    return rows + inference_rows[:1] + training_rows + inference_rows[1:], sections


def main(args: argparse.Namespace | None = None) -> str:
    """Run every target, write the report to ``args.output`` and return it."""
    args = args if args is not None else get_args_parser().parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu needs a CUDA device; run without it for the CPU targets")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows, sections = measure(args, start)
    elapsed = time.perf_counter() - start
    header = (f"Written by `python bench/run_bench.py` ({'with --gpu, ' if args.gpu else ''}`make bench`) in "
              f"{elapsed / 60:.1f} min: {environment(load_before)}.")
    report = render_report(args, rows, sections, header)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report, encoding="utf-8")
    print(report)
    log(f"wrote {args.output}", start)
    return report

if __name__ == "__main__":
    run_cli(main)
