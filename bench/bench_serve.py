"""Load check of the web service: N concurrent clients on localhost send a fixed number of classify requests.

    python bench/bench_serve.py                                   # a random lsnet_t_artist at 224 px, 8 clients
    python bench/bench_serve.py --checkpoint demo_run/model --clients 16 --requests 400
    python bench/bench_serve.py --enroll-images 4                 # also: classify while a client enrolls artists

Starts ``serve.py`` on a free 127.0.0.1 port, sends ``--requests`` requests of ``--images-per-request`` images (one
by default) from ``--clients`` threads (bounded: every request has a timeout and the whole run ``--time-limit-s``),
and reports images/s, p50/p95
latency and failed requests; then, with the server stopped, the same images through the predictor directly (one
image per call, and batches of ``--max-batch``) for comparison. With ``--enroll-images K`` the server gets a gallery
(``--gallery-artists`` artists of K generated works, tools/build_gallery.py) and the classify load runs twice: alone,
then while one more client enrolls new artists of K images each (POST /v1/gallery/artists) for as long as it lasts.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
import urllib3
from PIL import Image

import model  # noqa: F401  (registers the models)
from data.class_mapping import write_class_mapping
from inference.flags import ENGINES, default_engine
from predictor import load_model_bundle
from tools import build_gallery
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="model folder (default: a randomly initialised lsnet_t_artist with 10 classes)")
    parser.add_argument("--input-size", type=int, default=224, help="input size of the default model (default: 224)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests in all (default: 200)")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="images in each request (multipart field files, at most serve.py's --max-files; "
                             "default: 1)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs (default: 256)")
    parser.add_argument("--max-batch", type=int, default=32, help="serve.py --max-batch (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="serve.py --max-wait-ms (default: 10)")
    parser.add_argument("--engine", choices=ENGINES, default=default_engine(),
                        help="serve.py --engine and the direct runs' engine (default: auto, or $LSNET_ENGINE)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of the server and of the direct runs (default: torch's, one per core)")
    parser.add_argument("--time-limit-s", type=float, default=300.0, help="stop sending after this (default: 300)")
    parser.add_argument("--enroll-images", type=int, default=0,
                        help="also measure classify while a client enrolls artists of this many images each "
                             "(default: 0, classify only)")
    parser.add_argument("--gallery-artists", type=int, default=8,
                        help="artists of the starting gallery with --enroll-images (default: 8)")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (markdown) here")
    return parser


def random_model_folder(folder: Path, input_size: int) -> Path:
    """A randomly initialised lsnet_t_artist model folder (the speed does not depend on the weights)."""
    classes = [f"artist_{i}" for i in range(10)]
    torch.manual_seed(0)
    net = timm.create_model("lsnet_t_artist", num_classes=len(classes))
    torch.save({"model": net.state_dict()}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", classes)
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "input_size": input_size}))
    return folder


def make_jpegs(count: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def make_gallery(checkpoint: Path, folder: Path, jpegs: list[bytes], args: argparse.Namespace) -> Path:
    """A gallery of ``--gallery-artists`` artists with ``--enroll-images`` of the generated JPEGs each."""
    for a in range(args.gallery_artists):
        (folder / "refs" / f"artist_{a}").mkdir(parents=True)
        for i in range(args.enroll_images):
            (folder / "refs" / f"artist_{a}" / f"{i}.jpg").write_bytes(jpegs[(a + i) % len(jpegs)])
    build_gallery.main(build_gallery.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--images", str(folder / "refs"), "--output-dir", str(folder / "gallery"),
         "--device", "cpu"]))
    return folder / "gallery"


def start_server(checkpoint: Path, args: argparse.Namespace, gallery: Path | None = None
                 ) -> tuple[subprocess.Popen, str]:
    """``serve.py`` on a free port; returns the process and its base URL once /readyz answers."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {})}
    process = subprocess.Popen(
        [sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", "0", "--log-level", "warning",
         "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
         "--max-queue", str(max(64, 2 * args.clients)), "--engine", args.engine]
        + (["--gallery", str(gallery)] if gallery else []),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    line = process.stdout.readline()
    while line.startswith(("engine: ", "notice: ")):  # the first --engine auto run exports the model
        line = process.stdout.readline()
    watchdog.cancel()
    if " on http://" not in line:
        process.kill()
        raise UserError(f"serve.py did not start: {line}{process.stdout.read()[-2000:]}")
    url = line.split(" on ")[1].split("/ ")[0]
    threading.Thread(target=process.stdout.read, daemon=True).start()  # a full pipe would block the server
    http = urllib3.PoolManager(retries=False, timeout=5)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if http.request("GET", f"{url}/readyz").status == 200:
                return process, url
        except urllib3.exceptions.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise UserError("serve.py did not become ready within 120 s")


def load(url: str, jpegs: list[bytes], args: argparse.Namespace) -> tuple[float, list[float], int]:
    """Elapsed seconds, per-request latencies (successful ones) and the number of failed requests; each request
    carries ``args.images_per_request`` images."""
    http = urllib3.PoolManager(maxsize=args.clients, retries=False, timeout=60)
    lock, sent, latencies, failures = threading.Lock(), [0], [], [0]
    deadline = time.monotonic() + args.time_limit_s

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= args.requests:
                    return
                index = sent[0]
                sent[0] += 1
            start = time.perf_counter()
            try:
                fields = [("files", (f"img{index}_{i}.jpg", jpegs[(index + i) % len(jpegs)], "image/jpeg"))
                          for i in range(args.images_per_request)]
                ok = http.request("POST", f"{url}/v1/classify", fields=fields).status == 200
            except urllib3.exceptions.HTTPError:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures[0] += 1

    for index in range(min(4, len(jpegs))):  # warm-up
        http.request("POST", f"{url}/v1/classify", fields=[("files", ("w.jpg", jpegs[index], "image/jpeg"))])
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client) for _ in range(args.clients)]:
            future.result()
    return time.perf_counter() - start, latencies, failures[0] + args.requests - sent[0]


def direct(checkpoint: Path, jpegs: list[bytes], args: argparse.Namespace) -> tuple[float, float]:
    """Images/s through the predictor in this process: one image per call, and batches of --max-batch."""
    artist_model = load_model_bundle(checkpoint, device="cpu", engine=args.engine, decode_threads=2)
    files = [io.BytesIO(jpegs[i % len(jpegs)]) for i in range(args.requests * args.images_per_request)]
    artist_model.classify(files[:4])  # warm-up
    for f in files:
        f.seek(0)
    start = time.perf_counter()
    for f in files:
        artist_model.classify(f)
    single = len(files) / (time.perf_counter() - start)
    for f in files:
        f.seek(0)
    start = time.perf_counter()
    artist_model.run_paths(files, top_k=5, batch_size=args.max_batch, num_workers=2)
    return single, len(files) / (time.perf_counter() - start)


def enroll_while(url: str, jpegs: list[bytes], per_artist: int, stop: threading.Event) -> list[float]:
    """Enroll new artists of ``per_artist`` images, one after the other, until ``stop``; their latencies."""
    http = urllib3.PoolManager(retries=False, timeout=120)
    latencies: list[float] = []
    while not stop.is_set():
        index = len(latencies)
        fields = [("artist", f"enrolled_{index}")] + [
            ("files", (f"{index}_{i}.jpg", jpegs[(index + i) % len(jpegs)], "image/jpeg")) for i in range(per_artist)]
        start = time.perf_counter()
        response = http.request("POST", f"{url}/v1/gallery/artists", fields=fields)
        if response.status != 201:
            raise UserError(f"enrolling failed: {response.status} {response.data[:300]!r}")
        latencies.append(time.perf_counter() - start)
    return latencies


def measure_service(checkpoint: Path, jpegs: list[bytes], args: argparse.Namespace, tmp: Path) -> list[str]:
    """The report rows of the service: classify alone and, with --enroll-images, while a client enrolls."""
    gallery = make_gallery(checkpoint, tmp, jpegs, args) if args.enroll_images else None
    process, url = start_server(checkpoint, args, gallery)
    try:
        per = args.images_per_request
        rows = [service_row("service over HTTP", per, *load(url, jpegs, args))]
        if args.enroll_images:
            stop = threading.Event()
            with ThreadPoolExecutor(1) as pool:
                enrolls = pool.submit(enroll_while, url, jpegs, args.enroll_images, stop)
                try:
                    during = load(url, jpegs, args)
                finally:
                    stop.set()
                times = enrolls.result()
            rows.append(service_row(f"service over HTTP while another client enrolls artists of "
                                    f"{args.enroll_images} images ({len(times)} enrolled, p50 "
                                    f"{np.percentile(times, 50) * 1000:.0f} ms each)", per, *during))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


def service_row(name: str, images_per_request: int, elapsed: float, latencies: list[float], failed: int) -> str:
    """A report row: images/s of the successful requests, their p50/p95 latency, the failed requests."""
    p50, p95 = (np.percentile(latencies, [50, 95]) * 1000) if latencies else (float("nan"),) * 2
    return f"| {name} | {len(latencies) * images_per_request / elapsed:.1f} | {p50:.0f} | {p95:.0f} | {failed} |"


def main(args: argparse.Namespace) -> str:
    if min(args.clients, args.requests, args.images_per_request) < 1 or args.enroll_images < 0:
        raise UserError("--clients, --requests and --images-per-request must be at least 1, --enroll-images at "
                        "least 0")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_model_folder(Path(tmp), args.input_size)
        jpegs = make_jpegs(16, args.image_size)
        rows = measure_service(checkpoint, jpegs, args, Path(tmp))
        single, batched = direct(checkpoint, jpegs, args)
    report = "\n".join([
        f"# serve.py load check ({args.clients} clients, {args.requests} requests of {args.images_per_request} "
        f"image(s), "
        f"{args.image_size} px JPEGs, --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g})",
        "",
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, torch threads "
        f"{torch.get_num_threads()}; the direct runs follow the service's, with the server stopped.",
        "",
        "| | images/s | p50 ms (request) | p95 ms (request) | failed requests |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        f"| predictor directly, one image per call | {single:.1f} | | | |",
        f"| predictor directly, batches of {args.max_batch} | {batched:.1f} | | | |",
        "",
    ])
    print(report)
    if args.output:
        args.output.write_text(report, encoding="utf-8")
    failed = sum(int(row.rsplit("|", 2)[1]) for row in rows)
    if failed:
        raise UserError(f"{failed} requests failed")
    return report


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
