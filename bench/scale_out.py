"""Past one machine: embedding sharded over ``torchrun`` processes.

    python bench/bench_scale.py --steps shards            # 20,000 images: 1 process, then 2 under torchrun
    python bench/bench_scale.py --steps shards --quick    # 1,000 images

``inference_artist.py --mode cluster --batch-size 64 --input-size 128`` of an untrained ``lsnet_t_artist`` on the
CPU, on the same images (those of :mod:`scale_inference`: distinct 32 px files hard-linked under as many names as
needed): one process on one thread, one process with its threads on every core, then ``torchrun --standalone
--nproc_per_node=2`` (each process on half of the cores: :mod:`inference.sharding`). The throughput is the
script's own (the images over the seconds from the start of the run over them to the outputs written, all shards
included; imports and model loading left out); the wall time is the whole command's. Peak memory is that of the
largest process (``ru_maxrss`` of the waited-for process tree). The outputs are compared byte for byte.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale_inference import make_images, make_model_folder

ROOT = Path(__file__).resolve().parents[1]
SIZE = {False: 20_000, True: 1_000}
FLAGS = ("--mode", "cluster", "--batch-size", "64", "--input-size", "128", "--device", "cpu")
RATE = re.compile(r"run now in [\d.]+s, ([\d.]+) img/s")


def embed(launcher: list[str], threads: str | None, model: Path, images: Path,
          out: Path) -> tuple[float, float, float]:
    """One run (``threads``: its OMP_NUM_THREADS, None: unset): (the script's images per second, wall seconds,
    peak GiB of its largest process)."""
    command = [*launcher, str(ROOT / "inference_artist.py"), "--checkpoint", str(model), "--input", str(images),
               "--output", str(out), *FLAGS]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    began = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    text = Path(f"{out}.log").read_text()
    rate = RATE.search(text)
    if os.waitstatus_to_exitcode(status) != 0 or rate is None:
        raise RuntimeError(f"{' '.join(launcher)} inference_artist.py failed: {text.strip().splitlines()[-1:]}")
    return float(rate.group(1)), seconds, usage.ru_maxrss / 2**20


def shards_step(quick: bool) -> list[dict]:
    """1 process against 2 torchrun processes on the same images: images/s and their ratio."""
    count = SIZE[quick]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale_out_") as tmp:
        tmp = Path(tmp)
        model = make_model_folder(tmp / "model")
        images = make_images(tmp / "images", count, tmp / "distinct")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        launchers = {"1 process, 1 thread": ([sys.executable], "1"), "1 process": ([sys.executable], None),
                     "torchrun, 2 processes": (torchrun, None)}
        rates = []
        for name, (launcher, threads) in launchers.items():
            out = tmp / re.sub(r"\W+", "_", name)
            rate, seconds, peak = embed(launcher, threads, model, images, out)
            rates.append(rate)
            rows.append({"path": f"inference_artist.py --mode cluster, {name}", "size": f"{count:,} images",
                         "seconds": seconds, "peak_gib": peak, "note": f"{rate:.0f} img/s"})
        same = all((tmp / "1_process" / name).read_bytes() == (out / name).read_bytes()
                   for name in ("batch_results.json", "features.npy", "image_names.txt"))
    rows[-1]["target"] = "same outputs; more img/s with more processes"
    rows[-1]["note"] += (f"; {rates[2] / rates[1]:.2f}x one process on all {os.cpu_count()} cores, "
                         f"{rates[2] / rates[0]:.2f}x one on 1 thread; outputs {'identical' if same else 'DIFFERENT'}")
    return rows


STEPS = {"shards": shards_step}
