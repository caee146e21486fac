"""Sharded embedding under torchrun: two processes (gloo, CPU) each run their half of the sorted image list, the main
one writes the outputs of a one-process run. A shard whose process hangs and is killed continues with --resume.

Rank 1's half holds a named pipe with an image name: reading it blocks, so that process hangs mid-shard
deterministically until the test kills it (a real SIGKILL); the pipe is then replaced by an image (same names, so
the run's identity holds) and the same command with --resume finishes the run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagegen as gen
import pytest
from test_inference import write_model_folder

import inference_artist
from artifacts.outputs import BATCH_RESULTS_FILE, FEATURES_FILE, NAMES_FILE
from artifacts.work_folder import PROGRESS_FILE, Part, WorkFolder, shard_ranges, work_folder_for
from inference.sharding import wait_for_parts
from retrieval.gallery import load_gallery
from tools import build_gallery
from utils import UserError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BROKEN = ("img02.jpg", "img08.jpg")  # unreadable: one in each shard
PIPE = "img06.png"  # in rank 1's shard: [4, 10) in batches of 2
COMMON = ["--device", "cpu", "--num-workers", "0", "--batch-size", "2"]


def torchrun(script, *flags, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / script), *map(str, flags), *COMMON]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "distributed: 2 processes, backend gloo" in result.stdout
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model folder, 10 images (2 unreadable, 1 a pipe for now) and reference images of 2 artists."""
    tmp = tmp_path_factory.mktemp("sharding")
    run_dir = write_model_folder(tmp / "run")
    for i in range(10):
        name = f"img{i:02d}.{'jpg' if f'img{i:02d}.jpg' in BROKEN else 'png'}"
        if name in BROKEN:
            gen.truncated_jpeg(tmp / "images" / name)
        elif name != PIPE:
            gen.noise_image(tmp / "images" / name, (64, 48 + i), seed=i)
    os.mkfifo(tmp / "images" / PIPE)
    for artist in ("x", "y"):
        for i in range(3):
            gen.noise_image(tmp / "refs" / artist / f"{i}.png", (64, 64), seed=100 + 10 * len(artist) + i)
        gen.noise_image(tmp / "val" / artist / "v.png", (64, 64), seed=200 + len(artist))
    return {"tmp": tmp, "run": run_dir, "images": tmp / "images"}


def inference_flags(world, out):
    return ["--checkpoint", world["run"], "--input", world["images"], "--output", out, "--mode", "both",
            "--top-k", "2"]


def rank_pid(rank, marker):
    """The process of ``rank`` whose command line holds ``marker``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        worker = b"torch.distributed.run" not in cmdline  # not torchrun itself
        if worker and marker.encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def wait_until(condition, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def assert_same_outputs(sharded, single):
    """The same files to the bit: shards are cut at batch boundaries, so every batch is one of a one-process run."""
    for name in (BATCH_RESULTS_FILE, FEATURES_FILE, NAMES_FILE):
        assert (sharded / name).read_bytes() == (single / name).read_bytes(), name
    skipped = json.loads((sharded / BATCH_RESULTS_FILE).read_text())["skipped"]
    assert [item["path"] for item in skipped] == list(BROKEN)


def test_a_hung_shard_killed_then_resumed_gives_the_outputs_of_one_process(world):
    out = world["tmp"] / "sharded"
    flags = inference_flags(world, out)
    run = torchrun("inference_artist.py", *flags, wait=False)
    parts = work_folder_for(out)
    try:
        wait_until(lambda: (parts / "part-00001").is_dir() and (parts / "part-00000" / PROGRESS_FILE).is_file()
                   and json.loads((parts / "part-00000" / PROGRESS_FILE).read_text())["done"] == 4)
        wait_until(lambda: rank_pid(1, str(out)) is not None, 10)
        os.kill(rank_pid(1, str(out)), signal.SIGKILL)  # hung on the pipe, mid-shard
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0
    assert ("stopped while waiting for shard 1 of 2 (images 4-9 of 10) with 0 done: the same command with --resume "
            "continues") in stderr
    assert not (out / BATCH_RESULTS_FILE).exists()

    (world["images"] / PIPE).unlink()
    gen.noise_image(world["images"] / PIPE, (64, 54), seed=6)
    resumed = torchrun("inference_artist.py", *flags, "--resume")
    assert "resuming: 4 of 10 images done" in resumed.stdout
    assert not parts.exists()
    single = world["tmp"] / "single"
    inference_artist.main(inference_artist.get_args_parser().parse_args(map(str, [*inference_flags(world, single),
                                                                                  *COMMON])))
    assert_same_outputs(out, single)


def test_sharded_gallery_equals_one_process(world):
    flags = ["--checkpoint", world["run"], "--images", world["tmp"] / "refs", "--calibrate", world["tmp"] / "val"]
    torchrun("tools/build_gallery.py", *flags, "--output-dir", world["tmp"] / "g2")
    args = build_gallery.get_args_parser().parse_args(map(str, [*flags, "--output-dir", world["tmp"] / "g1",
                                                                *COMMON]))
    single, sharded = build_gallery.main(args), load_gallery(world["tmp"] / "g2")
    assert sharded.vectors.tobytes() == single.vectors.tobytes()
    assert sharded.paths == single.paths and sharded.artists == single.artists
    assert sharded.artist_thresholds == pytest.approx(single.artist_thresholds, abs=1e-5)
    assert not work_folder_for(world["tmp"] / "g2").exists()


# ------------------------------------------------------------------------------------------- planning, in-process


def test_shards_are_nearly_equal_and_resume_needs_the_same_count(tmp_path):
    assert shard_ranges(10, 3) == [[0, 3], [3, 6], [6, 10]] and shard_ranges(1, 2) == [[0, 0], [0, 1]]
    assert shard_ranges(10, 2, 4) == [[0, 4], [4, 10]] and shard_ranges(3, 2, 4) == [[0, 0], [0, 3]]
    work = WorkFolder.start(tmp_path / "w", {"a": 1}, 10, resume=False, shards=2)
    with work.parts[1].writer(("x.txt",)) as writer:
        writer.append(2, 2, {"x.txt": b"a\nb\n"})
    with pytest.raises(UserError, match=r"--resume: .* was started by 2 process\(es\), this run has 3; continue it "
                                        r"with 2 \(torchrun --nproc_per_node and --nnodes\) or with one process"):
        WorkFolder.start(tmp_path / "w", {"a": 1}, 10, resume=True, shards=3)
    one = WorkFolder.start(tmp_path / "w", {"a": 1}, 10, resume=True)  # one process continues every part
    assert [(p.start, p.stop, p.progress.done) for p in one.parts] == [(0, 5, 0), (5, 10, 2)]


def test_waiting_for_a_shard_that_stops_is_one_line_naming_it(tmp_path):
    work = WorkFolder.start(tmp_path / "w", {"a": 1}, 4, resume=False, shards=2)
    for part in work.parts[:1]:
        with part.writer(("x.txt",)) as writer:
            writer.append(2, 2, {"x.txt": b"a\nb\n"})
    with pytest.raises(UserError, match=r"^shard 1 of 2 \(images 2-3 of 4\) made no progress in 0 s \(0 of its 2 "
                                        r"images done\): its process stopped or hangs; the results so far are kept"):
        wait_for_parts(work, stall=0.2, poll=0.05)
    with Part(work.parts[1].folder, 2, 4).writer(("x.txt",)) as writer:
        writer.append(2, 2, {"x.txt": b"c\nd\n"})
    wait_for_parts(work, stall=0.2, poll=0.05)  # complete: returns at once
