"""What every script shares: utils.run_cli (a closed stdout, running out of memory) and the worker defaults sized
from the CPU cores this process may use."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

import train_artist_style
from data.scan import cgroup_cpu_limit, usable_cpus
from inference.flags import add_runtime_args
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_stdout_ends_a_script_quietly(tmp_path):
    """``compare_vectors.py ... | head -1``: the reader goes away after one line, the script exits without a
    traceback (with 141, as a command stopped by SIGPIPE does)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "refs.npy", rng.normal(size=(3000, 8)).astype(np.float32))
    np.save(tmp_path / "queries.npy", rng.normal(size=(4, 8)).astype(np.float32))
    # 12,000 table lines, far more than a pipe buffers: the script is still writing when the reader closes.
    command = [sys.executable, "tools/compare_vectors.py", "--query-vector", str(tmp_path / "queries.npy"),
               "--reference-vectors", str(tmp_path / "refs.npy"), "--top-k", "3000"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"query: ")
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and stderr == ""


def test_running_out_of_memory_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: np.ones((2**20, 2**20, 2**10), np.float32))  # 4 PiB: numpy refuses at once
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not enough memory: Unable to allocate 4.00 PiB for an array with shape")
    assert "lower the batch size" in err and err.count("\n") == 1


def test_cgroup_cpu_quota(tmp_path):
    for text, cpus in (("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)):
        (tmp_path / "v2").mkdir(exist_ok=True)
        (tmp_path / "v2" / "cpu.max").write_text(text)
        assert cgroup_cpu_limit(tmp_path / "v2") == cpus, text
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, cpus in (("300000", 3), ("-1", None)):
        (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert cgroup_cpu_limit(tmp_path / "v1") == cpus, quota
    assert cgroup_cpu_limit(tmp_path / "none") is None


def default_workers() -> tuple[int, int]:
    """``--num-workers`` defaults of training and of the inference scripts, as a fresh parser sets them."""
    training = train_artist_style.get_args_parser().parse_args(["--data-path", "x"]).num_workers
    inference = add_runtime_args(train_artist_style.argparse.ArgumentParser()).parse_args([]).num_workers
    return training, inference


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_worker_defaults_follow_the_cores_this_process_may_use():
    """A process allowed one core defaults to one data-loading worker, so PyTorch does not warn that the workers
    exceed the suggested maximum (as the fixed default of 10 did on a 2-core machine)."""
    allowed = os.sched_getaffinity(0)
    assert default_workers()[0] == min(10, usable_cpus()) and usable_cpus() <= len(allowed)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cpus() == 1 and default_workers() == (1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DataLoader([0], num_workers=default_workers()[0]).check_worker_number_rationality()
        with pytest.warns(UserWarning, match="suggested max number of worker in current system is 1"):
            DataLoader([0], num_workers=10).check_worker_number_rationality()
    finally:
        os.sched_setaffinity(0, allowed)


def test_every_script_runs_through_run_cli():
    scripts = [p for pattern in ("*.py", "tools/*.py", "bench/*.py") for p in sorted(ROOT.glob(pattern))
               if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")]
    missing = [p.name for p in scripts if "run_cli(" not in p.read_text(encoding="utf-8")]
    # bench_verify.py measures the memory of forked verifying processes, so it stays free of torch (utils imports it).
    assert len(scripts) > 20 and missing == ["bench_verify.py"]
