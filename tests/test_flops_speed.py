"""flops.py, speed.py and perf/: paper FLOPs, the SKA FLOP handle, the benchmark tables, the benchmarked variants'
outputs, and the report rows of bench/run_bench.py.

Correctness only: no test asserts a speed.
"""

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import flops
import speed
from model.ska import SKA
from perf.benchmark import Result
from perf.flop_count import count_flops
from perf.models import prepare_model
from perf.report import Row, parse_markdown_table
from perf.workloads import SpeedSettings, add_speed_args, parse_speed_args
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| entry | img/s median | img/s min | img/s max | peak memory MiB | ratio to first |"


def randomize_batchnorm(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that fusion changes the weights for real."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


# --------------------------------------------------------------------------------------------- flops.py


def test_flops_reproduce_paper(capsys):
    rows = flops.main(flops.get_args_parser().parse_args(["--model", "lsnet_t", "lsnet_s", "lsnet_b"]))
    assert {row["model"]: round(row["flops"] / 1e9, 1) for row in rows} == {
        "lsnet_t": 0.3, "lsnet_s": 0.5, "lsnet_b": 1.3}
    assert {row["model"]: round(row["params"] / 1e6, 1) for row in rows} == {
        "lsnet_t": 11.4, "lsnet_s": 16.1, "lsnet_b": 23.3}
    assert "lsnet_b at 224: 23.31 M params, 1.259 GFLOPs (1.3 G)" in capsys.readouterr().out


@pytest.mark.parametrize(("n", "c", "h", "w", "k", "groups"), [(2, 16, 5, 7, 3, 4), (1, 12, 6, 6, 5, 3)])
def test_ska_handle_counts_k_squared_per_output(n, c, h, w, k, groups):
    x, weights = torch.randn(n, c, h, w), torch.randn(n, groups, k * k, h, w)
    analysis = count_flops(SKA(), (x, weights))
    assert analysis.total() == n * c * h * w * k * k
    assert set(analysis.by_operator()) == {"PythonOp._SKAFunction"}


class _Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class _CustomOpModel(nn.Module):
    def forward(self, x):
        return _Doubler.apply(x)


def test_count_flops_refuses_uncounted_custom_ops():
    with pytest.raises(RuntimeError, match="_Doubler"):
        count_flops(_CustomOpModel(), (torch.randn(2, 3),))


# --------------------------------------------------------------------------------------------- speed.py


def run_speed(argv: list[str], capsys) -> tuple[list[Result], str]:
    results = speed.main(speed.get_args_parser().parse_args(argv))
    return results, capsys.readouterr().out


TINY = ["--batch-size", "2", "--resolution", "64", "--repeats", "2", "--warmup", "1"]


def test_speed_inference_prints_table(capsys):
    results, out = run_speed(["--model", "lsnet_t_artist", *TINY], capsys)
    assert TABLE_HEADER in out
    assert "| lsnet_t_artist |" in out and "torch.profiler allocation replay" in out
    (result,) = results
    assert len(result.images_per_s) == 2 and all(v > 0 for v in result.images_per_s)
    weights = sum(p.numel() * 4 for p in timm.create_model("lsnet_t_artist").parameters())
    assert result.peak_bytes > weights  # own state plus activations


def test_speed_train_prints_table(capsys):
    results, out = run_speed(["--train", "--model", "lsnet_t_artist", *TINY, "--resolution", "224"], capsys)
    assert out.startswith("training step (forward + backward + AdamW)")
    assert TABLE_HEADER in out
    # weights, gradients and AdamW's two moments are all alive during a step
    weights = sum(p.numel() * 4 for p in timm.create_model("lsnet_t_artist").parameters())
    assert results[0].peak_bytes > 4 * weights


def test_speed_compare_prints_ratios(capsys):
    results, out = run_speed(["--compare", "lsnet_t_artist:naive,lsnet_t_artist", *TINY], capsys)
    assert [r.label for r in results] == ["lsnet_t_artist:naive", "lsnet_t_artist"]
    rows = [line for line in out.splitlines() if line.startswith("| lsnet_t_artist")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |")


def test_speed_compiled_variant(capsys):
    # timm's tiny test_resnet: the :compiled path is the same for every model, and compiling LSNet takes a minute
    # (tests/test_inference.py compiles it once, against the eager model).
    results, out = run_speed(["--compare", "test_resnet:compiled,test_resnet", *TINY, "--no-memory"], capsys)
    assert [r.label for r in results] == ["test_resnet:compiled", "test_resnet"]
    assert all(v > 0 for r in results for v in r.images_per_s)
    assert "| test_resnet:compiled |" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "lsnet_t_artist:fast"], "unknown variant tag"),
        (["--model", "no_such_model"], "unknown model"),
        (["--model", "efficientvit_m3:naive"], "no SKA layer"),
        (["--amp"], "--amp autocasts to --dtype"),
        (["--train", "--dtype", "float16"], "add --amp"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], "device"),
    ],
)
def test_speed_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        speed.main(speed.get_args_parser().parse_args([*TINY, *argv]))


def test_speed_cli_error_exit_code():
    proc = subprocess.run([sys.executable, "speed.py", "--model", "lsnet_t_artist:fast"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown variant tag")


@pytest.mark.parametrize("resolution", [64, 224])
def test_naive_unfused_and_fused_fast_models_agree(resolution):
    torch.manual_seed(0)
    net = timm.create_model("lsnet_t_artist", num_classes=10)
    randomize_batchnorm(net)
    naive = prepare_model(copy.deepcopy(net), "naive")
    fast = prepare_model(copy.deepcopy(net), "fused")
    assert {m.impl for m in naive.modules() if isinstance(m, SKA)} == {"reference"}
    assert {m.impl for m in fast.modules() if isinstance(m, SKA)} == {"auto"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.patch_embed.modules())  # fused
    x = torch.randn(2, 3, resolution, resolution)
    with torch.inference_mode():
        expected, actual = naive(x), fast(x)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_training_with_naive_ska_matches_fast_gradients():
    torch.manual_seed(0)
    net = timm.create_model("lsnet_t_artist", num_classes=10).double()  # float64: train-mode BatchNorm on a batch
    naive = prepare_model(copy.deepcopy(net), "naive", train=True)    # of 2 amplifies float32 summation order
    fast = prepare_model(copy.deepcopy(net), "unfused", train=True)
    x, target = torch.randn(2, 3, 224, 224, dtype=torch.float64), torch.tensor([1, 7])
    grads = []
    for m in (naive, fast):
        torch.nn.functional.cross_entropy(m(x), target).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert (grads[1] - grads[0]).abs().max() <= 1e-4 * grads[0].abs().max()


# --------------------------------------------------------------------------------------------- bench/run_bench.py


def test_bench_runner_reads_tables_and_judges_rows():
    table = parse_markdown_table(
        "SKA x=...\n\n| impl | fwd ms | fwd+bwd peak MiB (ratio) |\n|---|---:|---:|\n"
        "| reference | 66.46 | 226.6 (1.000) |\n| torch | 4.18 | 26.0 (0.115) |\n")
    assert table["torch"] == {"impl": "torch", "fwd ms": "4.18", "fwd+bwd peak MiB (ratio)": "26.0 (0.115)"}
    row = Row("2", "t", "m", ratio=1.5, required=2.0, command="c", why="w")
    assert not row.passed and row.verdict == "**miss** (-25% vs required)"
    assert Row("1", "t", "m", ratio=0.1, required=1 / 3, command="c", at_most=True).verdict == "pass"
    noisy = Row("2", "t", "m", ratio=4.0, required=2.0, command="c", spread=3.0)
    assert noisy.passed and not noisy.reliable and noisy.verdict.startswith("**unreliable** (pass")


def test_bench_commands_parse_as_speed_py_does():
    """The bench shows ``python speed.py ARGV`` next to each figure: the settings it measures are speed.py's."""
    argv = ["--train", "--compare", "lsnet_t_artist, efficientvit_m3", "--batch-size", "16", "--compile-mode",
            "default", "--no-memory"]
    settings = parse_speed_args(argv)
    assert settings == SpeedSettings.from_args(speed.get_args_parser().parse_args(argv))
    assert settings.entries == ("lsnet_t_artist", "efficientvit_m3")
    assert settings.compile and settings.train and not settings.memory  # --compile-mode implies compiling
    assert not parse_speed_args([]).compile
    with pytest.raises(UserError, match="no entries to measure"):
        SpeedSettings.from_args(add_speed_args(argparse.ArgumentParser()).parse_args(["--compare", " , "]))


def test_bench_ska_runs_as_a_script_and_writes_its_table():
    """bench/bench_ska.py runs from the repository root without path set-up and prints the table run_bench reads."""
    proc = subprocess.run([sys.executable, "bench/bench_ska.py", "--batch", "1", "--channels", "8", "--size", "5",
                           "--repeats", "1", "--warmup", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    table = parse_markdown_table(proc.stdout)
    assert set(table) >= {"reference", "torch"} and table["reference"]["fwd speed-up"] == "1.0x"
