"""Million-image inference: peak memory of ``inference_artist.py`` as the image count grows, and a run killed
partway then continued with ``--resume``.

    python bench/bench_scale.py --steps inference,resume            # 20k vs 200k images; 20k killed and resumed
    python bench/bench_scale.py --steps inference,resume --quick    # 2k vs 20k; 2k killed and resumed

Every run is ``inference_artist.py --mode both --no-json-features --batch-size 128`` of an untrained
``lsnet_t_artist`` (100 classes, 256-value features, 32 px input) in its own process; its peak memory is that
process's peak resident set (``ru_maxrss`` of ``os.wait4``). The images are 1,000 distinct tiny PNG / JPEG files
(32 px), hard-linked under as many names as the run needs (1,000 per sub-folder): every name is decoded like a file
of its own, and 200,000 of them take no more disk than 1,000. Everything is written to a temporary folder and
deleted after the step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DISTINCT = 1000
SIZES = {False: (20_000, 200_000), True: (2_000, 20_000)}
RESUME_SIZE = {False: 20_000, True: 2_000}
FLAGS = ("--mode", "both", "--no-json-features", "--batch-size", "128", "--device", "cpu")


def make_model_folder(folder: Path) -> Path:
    """An untrained lsnet_t_artist model folder (100 classes, 256-value features, 32 px)."""
    import timm
    import torch

    import model  # noqa: F401  (registers the models)
    from data import write_class_mapping

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = timm.create_model("lsnet_t_artist", num_classes=100, feature_dim=256)
    torch.save({"model": net.state_dict()}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", [f"artist_{i:03d}" for i in range(100)])
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "input_size": 32}))
    return folder


def make_images(folder: Path, count: int, source: Path) -> Path:
    """``count`` image names under ``folder`` (1,000 per sub-folder), hard links to the distinct ``source`` files."""
    if not source.exists():
        rng = np.random.default_rng(0)
        source.mkdir(parents=True)
        for i in range(DISTINCT):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(source / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    files = sorted(source.iterdir())
    for i in range(count):
        target = folder / f"{i // 1000:04d}" / f"{i:07d}{files[i % DISTINCT].suffix}"
        if i % 1000 == 0:
            target.parent.mkdir(parents=True)
        os.link(files[i % DISTINCT], target)
    return folder


def start(model: Path, images: Path, out: Path, *flags: str) -> subprocess.Popen:
    """``inference_artist.py`` on ``images`` in a new process (its stderr, progress bar included, in a file)."""
    command = [sys.executable, str(ROOT / "inference_artist.py"), "--checkpoint", str(model), "--input",
               str(images), "--output", str(out), *FLAGS, *flags]
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


def finish(proc: subprocess.Popen, out: Path, began: float) -> tuple[float, float, int, str]:
    """Wait for ``proc``: its wall seconds, peak resident GiB, exit status and last stderr line."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = (Path(f"{out}.log").read_text().strip().splitlines() or [""])[-1]
    return time.perf_counter() - began, usage.ru_maxrss / 2**20, proc.returncode, tail


def run(model: Path, images: Path, out: Path, *flags: str) -> tuple[float, float]:
    """One measured run (wall seconds, peak resident GiB); a failed run raises."""
    began = time.perf_counter()
    seconds, peak, code, tail = finish(start(model, images, out, *flags), out, began)
    if code != 0:
        raise RuntimeError(f"inference_artist.py failed (exit {code}): {tail}")
    return seconds, peak


def inference_step(quick: bool) -> list[dict]:
    """Two runs ten times apart in image count: the larger one's peak memory against the smaller one's."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale_inference_") as tmp:
        tmp = Path(tmp)
        model = make_model_folder(tmp / "model")
        peaks = []
        for count in SIZES[quick]:
            images = make_images(tmp / f"images_{count}", count, tmp / "distinct")
            seconds, peak = run(model, images, tmp / f"out_{count}")
            shutil.rmtree(images)
            shutil.rmtree(tmp / f"out_{count}")
            peaks.append(peak)
            rows.append({"path": "inference_artist.py --mode both (streamed)", "size": f"{count:,} images",
                         "seconds": seconds, "peak_gib": peak, "note": f"{count / seconds:.0f} img/s"})
        ratio = peaks[1] / peaks[0]
        rows[-1]["target"] = f"peak <= 1.5x the {SIZES[quick][0]:,}-image run's"
        rows[-1]["note"] += f"; peak {ratio:.2f}x the smaller run's: {'met' if ratio <= 1.5 else 'MISSED'}"
    return rows


def resume_step(quick: bool) -> list[dict]:
    """A run killed (SIGKILL) once a third of its images are committed, continued with --resume: the outputs of an
    uninterrupted run, byte for byte."""
    count = RESUME_SIZE[quick]
    with tempfile.TemporaryDirectory(prefix="scale_resume_") as tmp:
        tmp = Path(tmp)
        model = make_model_folder(tmp / "model")
        images = make_images(tmp / "images", count, tmp / "distinct")
        single_seconds, single_peak = run(model, images, tmp / "single")
        out = tmp / "resumed"
        progress = Path(f"{out}.partial") / "part-00000" / "progress.json"
        proc, began = start(model, images, out), time.perf_counter()
        while proc.poll() is None and not (progress.is_file()
                                           and json.loads(progress.read_text())["done"] >= count // 3):
            time.sleep(0.02)
        if proc.poll() is None:  # poll() reaps a run that already ended: then there is nothing to kill or wait for
            proc.send_signal(signal.SIGKILL)
            finish(proc, out, began)
        killed_at = json.loads(progress.read_text())["done"] if progress.is_file() else count
        seconds, peak = run(model, images, out, "--resume")
        same = all((tmp / "single" / name).read_bytes() == (out / name).read_bytes()
                   for name in ("batch_results.json", "features.npy", "image_names.txt"))
    return [
        {"path": "inference_artist.py, uninterrupted", "size": f"{count:,} images", "seconds": single_seconds,
         "peak_gib": single_peak},
        {"path": "inference_artist.py --resume after kill -9", "size": f"{count:,} images", "seconds": seconds,
         "peak_gib": peak, "target": "outputs identical to an uninterrupted run",
         "note": f"killed with {killed_at:,} images committed; outputs {'identical' if same else 'DIFFERENT'}"
                 + ("" if killed_at < count else " (the run ended before the kill: not a resume test)")},
    ]


STEPS = {"inference": inference_step, "resume": resume_step}
