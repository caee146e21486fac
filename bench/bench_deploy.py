"""CPU engines, honestly: each engine in its own process, idle and beside one busy process, against the fp32 ceiling.

    python bench/bench_deploy.py               # lsnet_t_artist at 224, 1,000 JPEGs: about 10 minutes on 2 cores
    python bench/bench_deploy.py --quick       # 200 JPEGs, shorter timings: about 3 minutes
    python bench/bench_deploy.py --service-only   # serve.py against the predictor alone: about 1 minute
    python bench/bench_deploy.py --trained demo_run/model --images demo_run/data/val   # + bf16/int8 agreement

Prints, in one run: the machine (CPU, usable cores, ISA flags, clock) and its fp32 ceiling (cores x fp32 FMA/cycle x
GHz over the model's multiply-adds per image, ``perf.flop_count``); the model alone at batch 32 with each engine
(PyTorch eager fused fp32, with ``OMP_WAIT_POLICY=PASSIVE``, bf16 autocast where the CPU has bf16; onnxruntime fp32
spinning on all cores and on one lane per core, int8 where the CPU has VNNI), each in a fresh process, idle and
beside one busy process (``python -c "while True: pass"``); ``inference_artist.py`` end to end over a folder of
JPEGs (256-512 px) with ``--engine torch`` and ``auto``, idle and busy (images/s of the whole run, and without
start-up: the difference to a 32-image run); ``serve.py`` under 8 concurrent clients (one image per request, and 4)
against the same predictor alone with batches of 32. Every figure is images/s; "share" is the busy figure over the
idle one. The model is randomly initialised (weights do not change the speed); ``--trained`` and ``--images`` add the
top-1 agreement of bf16 and int8 with fp32 on a trained model and your images (the only agreement worth a decision:
random logits are near ties)."""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from artifacts.config_file import ONNX_FILE
from artifacts.model_source import resolve_model_source
from data.resize import IMAGENET_MEAN, IMAGENET_STD
from data.scan import usable_cpus
from deploy.engine import CACHE_ENV, cache_key, entry_dir
from deploy.export_onnx import probe_inputs
from deploy.quantize import calibration_batch, quantize_int8
from deploy.reference import INPUT_NAME
from inference.flags import default_engine
from perf.flop_count import count_flops
from predictor import ArtistModel, OnnxModel, list_images, load_model_bundle
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BATCH = 32
SERVICE_FILES = 4  # images per request in the service's second row (8 clients x 4 = one batch of 32)
SERVICE_ROUNDS = 3  # the service and the predictor alone measured in turn, medians
# Engine variants timed on the model alone: (label, engine, extra environment, CPU flags one of which it needs).
VARIANTS = (("PyTorch eager fused fp32", "torch", {}, ()),
            ("PyTorch eager fused fp32, OMP_WAIT_POLICY=PASSIVE", "torch", {"OMP_WAIT_POLICY": "PASSIVE"}, ()),
            ("PyTorch eager fused bf16 autocast", "torch-bf16", {}, ("avx512_bf16", "amx_bf16")),
            ("onnxruntime fp32, spinning", "onnx", {}, ()),
            ("onnxruntime fp32, one lane per core (spinning off)", "onnx-lanes", {}, ()),
            ("onnxruntime int8 (static QDQ)", "onnx-int8", {}, ("avx512_vnni", "avx_vnni", "amx_int8")))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 JPEGs and shorter timings (about 3 minutes)")
    parser.add_argument("--service-only", action="store_true",
                        help="only the service rows: serve.py under 8 clients against the predictor alone, on 256 "
                             "JPEGs (about 1 minute)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=Path, default=None, help="with --trained: images to measure agreement on")
    parser.add_argument("--trained", type=Path, default=None, help="a trained model folder (bf16/int8 agreement)")
    parser.add_argument("--ghz", type=float, default=None, help="clock for the ceiling (default: /proc/cpuinfo)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (markdown) here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one engine's timing
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=8.0, help=argparse.SUPPRESS)
    return parser


def machine(ghz: float | None) -> dict:
    """CPU model, usable cores, ISA flags, clock and fp32 FMA lanes per cycle per core (2 FMA units assumed)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = {key.strip(): value.strip() for key, _, value in
             (line.partition(":") for line in text.split("\n\n")[0].splitlines())}
    flags = set(field.get("flags", "").split())
    named = re.search(r"@\s*([\d.]+)GHz", field.get("model name", ""))
    clock = ghz or (float(named.group(1)) if named else float(field.get("cpu MHz", 0)) / 1000 or None)
    lanes = 32 if "avx512f" in flags else 16 if {"avx2", "fma"} <= flags else 8
    return {"cpu": field.get("model name", "unknown"), "cores": usable_cpus(), "flags": flags, "ghz": clock,
            "fma_per_cycle": lanes}


def ceiling(info: dict, macs: float) -> float:
    """fp32 images/s if every core ran FMAs on every cycle."""
    return info["cores"] * info["fma_per_cycle"] * (info["ghz"] or float("nan")) * 1e9 / macs


@contextmanager
def competitor(busy: bool):
    """One busy process beside the measured one (or nothing)."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if process is not None:
            process.kill()
            process.wait()


def worker(args: argparse.Namespace) -> None:
    """Time one engine on the model alone (batch 32) in this fresh process; prints images/s."""
    engine = args.worker
    batch = np.resize(probe_inputs(4, args.input_size, IMAGENET_MEAN, IMAGENET_STD),
                      (BATCH, 3, args.input_size, args.input_size)).astype(np.float32)
    if engine.startswith("torch"):
        model = load_model_bundle(args.folder, engine="torch", device="cpu", decode_threads=0)
        x = torch.from_numpy(batch)

        def step() -> None:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=engine == "torch-bf16"):
                model.model(x)
    else:
        path = args.folder / "int8.onnx" if engine == "onnx-int8" else None
        model = load_model_bundle(args.folder, engine="onnx", decode_threads=1 if engine == "onnx-lanes" else 0)
        session = model.session
        if path is not None:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def step() -> None:  # a batch on each lane at once
            list(pool.map(lambda _: session.run(None, {INPUT_NAME: batch}), range(model.lanes)))
    pool = ThreadPoolExecutor(model.lanes)
    for _ in range(2):
        step()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        step()
        count += BATCH * model.lanes
    print(json.dumps({"images_per_s": count / (time.perf_counter() - start)}))


def run_worker(engine: str, env: dict, folder: Path, args: argparse.Namespace, busy: bool) -> float:
    command = [sys.executable, __file__, "--worker", engine, "--folder", str(folder), "--input-size",
               str(args.input_size), "--seconds", str(3.0 if args.quick else 8.0)]
    with competitor(busy):
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    if proc.returncode != 0:
        raise UserError(f"the {engine} worker failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_s"]


def model_table(info: dict, folder: Path, args: argparse.Namespace, top: float) -> list[str]:
    rows = ["| engine (model alone, batch 32) | idle | busy | share | idle / ceiling |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for label, engine, env, needs in VARIANTS:
        if needs and not info["flags"] & set(needs):
            rows.append(f"| {label} | (no {'/'.join(needs)}) | | | |")
            continue
        idle, busy = (run_worker(engine, env, folder, args, b) for b in (False, True))
        rows.append(f"| {label} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f} | {idle / top:.2f} |")
    return rows


def make_jpegs(folder: Path, count: int) -> Path:
    """``count`` JPEGs of 256-512 px sides: smooth colour fields with noise (decode cost of photographs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = rng.integers(256, 513, 2)
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3) + np.linspace(0, 255, h)[:, None, None] * 0.5
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=90)
    return folder


def inference_seconds(folder: Path, images: Path, engine: str, output: Path, busy: bool) -> float:
    command = [sys.executable, "inference_artist.py", "--checkpoint", str(folder), "--input", str(images),
               "--output", str(output), "--engine", engine, "--device", "cpu"]
    with competitor(busy):
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise UserError(f"inference_artist.py --engine {engine} failed: {proc.stderr.strip()[-300:]}")
    return seconds


def end_to_end_table(folder: Path, tmp: Path, count: int, top: float) -> list[str]:
    images, small = make_jpegs(tmp / "jpegs", count), tmp / "jpegs_32"
    small.mkdir()
    for name in sorted(os.listdir(images))[:32]:
        os.link(images / name, small / name)
    inference_seconds(folder, small, "auto", tmp / "warm", False)  # the file cache warm, the engine cache filled
    rows = [f"| inference_artist.py, {count} JPEGs | whole run | without start-up | busy: whole run | "
            "busy: without start-up | share | idle / ceiling | idle: a run of 32 JPEGs, s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for engine in ("torch", "auto"):
        speeds, small_run = [], None
        for busy in (False, True):
            full = inference_seconds(folder, images, engine, tmp / f"out_{engine}", busy)
            base = inference_seconds(folder, small, engine, tmp / f"out_{engine}_32", busy)
            small_run = base if small_run is None else small_run
            speeds += [count / full, (count - 32) / (full - base) if full > base else float("nan")]  # nan: noise
        rows.append(f"| --engine {engine} | {speeds[0]:.1f} | {speeds[1]:.1f} | {speeds[2]:.1f} | {speeds[3]:.1f} | "
                    f"{speeds[3] / speeds[1]:.2f} | {speeds[1] / top:.2f} | {small_run:.1f} |")
    return rows


def _alone(model: Any, paths: list[Path]) -> float:
    """Images/s of ``model`` over ``paths`` in batches of 32 on 2 decode threads (the service's batch size)."""
    start = time.perf_counter()
    model.run_paths(paths, batch_size=BATCH, num_workers=2)
    return len(paths) / (time.perf_counter() - start)


def service_rows(folder: Path, images: Path, quick: bool) -> list[str]:
    """serve.py (the default engine) under 8 clients, with one image and with 4 images per request, vs the same
    predictor alone, batches of 32: :data:`SERVICE_ROUNDS` rounds of the three in turn (a change of the machine's
    speed hits each alike), medians."""
    from bench_serve import load, start_server  # a sibling script (bench/ is on the path when this one runs)

    jpegs = [path.read_bytes() for path in sorted(images.iterdir())[:64]]
    settings = argparse.Namespace(clients=8, requests=64 if quick else 256, max_batch=BATCH, max_wait_ms=10.0,
                                  torch_threads=None, time_limit_s=300.0, engine=default_engine())
    model = load_model_bundle(folder, engine=settings.engine, decode_threads=2)
    paths = [images / name for name in sorted(os.listdir(images))[:settings.requests]]
    _alone(model, paths[:BATCH])  # warm-up
    speeds: dict[Any, list[float]] = {1: [], SERVICE_FILES: [], "alone": []}
    failed = dict.fromkeys((1, SERVICE_FILES), 0)
    process, url = start_server(folder, settings)
    try:
        for _ in range(SERVICE_ROUNDS):
            for per in (1, SERVICE_FILES):  # the same images in all
                run = argparse.Namespace(**{**vars(settings), "requests": settings.requests // per,
                                            "images_per_request": per})
                elapsed, latencies, failures = load(url, jpegs, run)
                speeds[per].append(len(latencies) * per / elapsed)
                failed[per] += failures
            speeds["alone"].append(_alone(model, paths))
    finally:
        process.terminate()
        process.wait(timeout=30)
    alone = float(np.median(speeds["alone"]))
    rows = [f"| serve.py ({type(model).__name__}), 8 clients, {'one image' if per == 1 else f'{per} images'} per "
            f"request | {np.median(speeds[per]):.1f} | {np.median(speeds[per]) / alone:.2f} | {failed[per]} failed |"
            for per in (1, SERVICE_FILES)]
    return rows + [f"| the same predictor alone, batches of {BATCH}, 2 decode threads | {alone:.1f} | 1.00 | |"]


def cached_onnx_file(folder: Path) -> Path:
    """The ``model.onnx`` of ``folder``'s entry in the engine cache."""
    return entry_dir(cache_key(resolve_model_source(folder), {})) / ONNX_FILE


def agreement_rows(trained: Path, images: Path) -> list[str]:
    """Top-1 agreement with fp32 of PyTorch bf16 and onnxruntime int8 on a trained model and ``images``."""
    paths = [images / name for name in list_images(images)]
    fp32 = load_model_bundle(trained, engine="torch", device="cpu")
    bf16 = load_model_bundle(trained, engine="torch", device="cpu", amp=True)
    onnx = load_model_bundle(trained, engine="onnx")
    assert isinstance(fp32, ArtistModel) and isinstance(onnx, OnnxModel)
    top1 = {label: np.array([c[0]["class_id"] for c in m.run_paths(paths, num_workers=2).classifications])
            for label, m in (("fp32", fp32), ("bf16", bf16), ("onnx", onnx))}
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "int8.onnx"
        quantize_int8(cached_onnx_file(trained), int8_path, calibration_batch(onnx, images), INPUT_NAME)
        int8 = OnnxModel(int8_path, onnx.class_names, onnx.config)
        top1["int8"] = np.array([c[0]["class_id"] for c in int8.run_paths(paths, num_workers=2).classifications])
    return [f"| {label} vs fp32 | {float((top1[label] == top1['fp32']).mean()):.1%} |" for label in
            ("bf16", "onnx", "int8")]


def header(info: dict, macs: float, top: float) -> list[str]:
    flags = ", ".join(flag for flag in ISA_FLAGS if flag in info["flags"]) or "none of " + ", ".join(ISA_FLAGS)
    import onnxruntime

    return [f"# CPU engines: lsnet_t_artist, batch {BATCH}", "",
            f"- CPU: {info['cpu']}, {info['cores']} usable cores, {info['ghz']} GHz; ISA: {flags}",
            f"- fp32 ceiling: {info['cores']} cores x {info['fma_per_cycle']} FMA/cycle x {info['ghz']} GHz / "
            f"{macs / 1e9:.3f} GMAC per image = {top:.0f} images/s",
            f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; load average at the start "
            f"{os.getloadavg()[0]:.1f} (an idle machine reads about 0)", ""]


def main(args: argparse.Namespace | None = None) -> str:
    args = args if args is not None else get_args_parser().parse_args()
    if args.worker:
        return worker(args)
    if (args.trained is None) != (args.images is None):
        raise UserError("--trained and --images go together: a trained model folder and images to compare on")
    info = machine(args.ghz)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ[CACHE_ENV] = str(tmp / "cache")  # the engine cache of this run (children inherit it)
        folder = tmp / "model"
        folder.mkdir()
        from bench_serve import random_model_folder

        random_model_folder(folder, args.input_size)
        net = load_model_bundle(folder, engine="torch", device="cpu").model
        macs = float(count_flops(net, (torch.zeros(1, 3, args.input_size, args.input_size),)).total())
        top = ceiling(info, macs)
        load_model_bundle(folder, engine="onnx")  # exported into the cache once
        lines = header(info, macs, top)
        if args.service_only:
            make_jpegs(tmp / "jpegs", 256)
        else:
            calibration = probe_inputs(8 if args.quick else BATCH, args.input_size, IMAGENET_MEAN, IMAGENET_STD)
            quantize_int8(cached_onnx_file(folder), folder / "int8.onnx", calibration, INPUT_NAME)
            lines += model_table(info, folder, args, top) + [""]
            lines += end_to_end_table(folder, tmp, 200 if args.quick else 1000, top) + [""]
        lines += ["| service | images/s | vs alone | |", "| --- | ---: | ---: | --- |"]
        lines += service_rows(folder, tmp / "jpegs", args.quick)
        if args.trained is not None:
            lines += ["", "| trained model, your images | top-1 agreement |", "| --- | ---: |"]
            lines += agreement_rows(args.trained, args.images)
    lines += ["", f"load average at the end {os.getloadavg()[0]:.1f}"]
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.write_text(report + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    run_cli(main)
