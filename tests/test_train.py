"""End-to-end tests of train_artist_style.py on a tiny generated dataset (32 px inputs, lsnet_t_artist, CPU).

Runs that only need the result call ``main`` in-process; the command-line behaviour (output, exit codes, torchrun)
is checked with subprocesses.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import train_artist_style
from artifacts.checkpoint import load_checkpoint, load_checkpoint_file, read_checkpoint
from training.config import TrainConfig
from training.factory import create_model
from training.trainer import Trainer
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_artist_style.py")
COLOURS = {"blue": (30, 60, 220), "green": (30, 200, 60), "red": (220, 40, 30), "yellow": (230, 220, 40)}
FAST = ["--device", "cpu", "--model", "lsnet_t_artist", "--input-size", "32", "--feature-dim", "32",
        "--num-workers", "0", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--print-freq", "100"]
NO_AUG = ["--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--color-jitter", "0", "--smoothing", "0",
          "--no-repeated-aug"]
# Without augmentation, so two short epochs learn the colours.
PLAIN = [*NO_AUG, "--lr", "1.0", "--batch-size", "8", "--model-ema-decay", "0.9"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


def make_dataset(root: Path, train_per_class: int, val_per_class: int = 4, size: int = 40) -> Path:
    """``train/`` + ``val/`` of noisy solid-colour images, one class per colour."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.array(colour)[None, None] + rng.integers(-30, 30, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def run_main(*argv: str):
    """``main`` in this process, with one torch thread (the tests share a small machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_artist_style.main(train_artist_style.get_args_parser().parse_args([*FAST, *argv]))
    finally:
        torch.set_num_threads(threads)


class Stopped(Exception):
    """The crash of :func:`train_straight_and_resumed`'s interrupted run."""


def stop_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make an in-process training run crash once its first epoch is saved."""
    real = Trainer.run_epoch

    def run_epoch(self, net, epoch):
        record = real(self, net, epoch)
        if epoch == 0:
            raise Stopped
        return record

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)


def train_straight_and_resumed(run: Callable[..., object], common: list[str], tmp_path: Path
                               ) -> tuple[dict, dict, dict]:
    """``run`` (in this process) 2 epochs in one go (``tmp_path/straight``), and 2 epochs that crash after the
    first, then --resume for the second (``tmp_path/resumed``); returns the resumed run's checkpoint after epoch 1
    and both final checkpoint.pth files."""
    run(*common, "--output-dir", str(tmp_path / "straight"), "--epochs", "2")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Stopped):
        stop_after_first_epoch(patch)
        run(*common, "--output-dir", str(tmp_path / "resumed"), "--epochs", "2")
    first = load_checkpoint_file(tmp_path / "resumed" / "checkpoint.pth")
    run(*common, "--output-dir", str(tmp_path / "resumed"), "--epochs", "2", "--resume", str(tmp_path / "resumed"))
    return (first, load_checkpoint_file(tmp_path / "straight" / "checkpoint.pth"),
            load_checkpoint_file(tmp_path / "resumed" / "checkpoint.pth"))


def run_script(*argv: str, launcher: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, SCRIPT, *FAST, *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.txt").read_text().splitlines()]


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("colours"), train_per_class=32)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("small"), train_per_class=8, val_per_class=2)


@pytest.fixture(scope="module")
def trained(colour_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two epochs from the command line, with EMA and per-epoch checkpoints."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_script("--data-path", str(colour_data), "--output-dir", str(output_dir), "--epochs", "2",
                        "--save-every", "1", *PLAIN)
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, result


def test_two_epochs_write_every_output_and_learn(trained):
    output_dir, result = trained
    names = {p.name for p in output_dir.iterdir() if not p.name.startswith("report_")}  # report PNGs: test_recipe
    assert names == {"checkpoint.pth", "model_best.pth", "checkpoint_epoch1.pth", "checkpoint_epoch2.pth",
                     "class_mapping.csv", "train_log.txt", "tensorboard", "args.json", "config.json", "report.html"}
    assert any(p.name.startswith("events.out.tfevents") for p in (output_dir / "tensorboard").iterdir())
    assert "learning rate 1 x effective batch 8" in result.stdout and "= 0.01562" in result.stdout
    assert "img/s" in result.stdout and "eta" in result.stdout

    log = read_log(output_dir)
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"epoch", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "ema_val_acc1", "time"} <= log[0].keys()
    best_acc = max(max(r["val_acc1"], r["ema_val_acc1"]) for r in log)
    assert best_acc > 100 / len(COLOURS)  # beats chance

    assert (output_dir / "class_mapping.csv").read_text().splitlines() == [
        "class_id,class_name", "0,blue", "1,green", "2,red", "3,yellow"]
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model"] == "lsnet_t_artist" and config["num_classes"] == 4 and config["feature_dim"] == 32
    assert config["input_size"] == 32 and config["use_projection"] and config["crop_pct"] == 0.875
    assert json.loads((output_dir / "args.json").read_text())["epochs"] == 2

    checkpoint = load_checkpoint_file(output_dir / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "best_metric", "args",
            "class_names", "rng_states"} <= checkpoint.keys()
    assert checkpoint["epoch"] == 1 and isinstance(checkpoint["args"], dict)
    assert checkpoint["class_names"] == list(COLOURS)
    best = load_checkpoint_file(output_dir / "model_best.pth")
    assert best["best_metric"] == pytest.approx(best_acc) and best["best_source"] in ("model", "model_ema")
    # The best file is a model folder checkpoint: loadable by the shared loader into the configured model.
    net = timm.create_model("lsnet_t_artist", num_classes=4, feature_dim=32)
    load_checkpoint(output_dir / "model_best.pth", net)


def test_eval_reproduces_the_logged_accuracy(trained):
    output_dir, _ = trained
    last = read_log(output_dir)[-1]
    data_path = json.loads((output_dir / "args.json").read_text())["data_path"]
    result = run_script("--data-path", data_path, "--eval", "--resume", str(output_dir / "checkpoint.pth"), *PLAIN)
    assert result.returncode == 0, result.stderr
    printed = {line.split("(")[1].split(" ")[0]: json.loads(line.split("): ", 1)[1])
               for line in result.stdout.splitlines() if " weights): " in line}
    assert printed["model"]["acc1"] == last["val_acc1"] and printed["model_ema"]["acc1"] == last["ema_val_acc1"]
    assert printed["model"]["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert not list(output_dir.glob("*.tmp"))

    # A model folder is evaluated from its best checkpoint, which reproduces the best accuracy.
    results = run_main("--data-path", data_path, "--eval", "--resume", str(output_dir), *PLAIN)
    best = load_checkpoint_file(output_dir / "model_best.pth")
    assert results["model"]["acc1"] == best["best_metric"]


def test_channels_last_trains_like_the_default_layout(small_data, tmp_path):
    """--channels-last changes only the memory layout: the same run's losses and weights agree with the default
    (up to the summation order of the convolution kernels, which train-mode BatchNorm on 1x1 maps of a batch of 8
    amplifies to ~1e-4), and the checkpoint loads into a plain model."""
    # The original recipe's small learning rate: the adaptive one's larger steps amplify the rounding differences.
    common = ["--data-path", str(small_data), "--batch-size", "8", "--epochs", "1", "--recipe", "imagenet", *NO_AUG]
    default = run_main(*common, "--output-dir", str(tmp_path / "default"))
    channels_last = run_main(*common, "--output-dir", str(tmp_path / "channels_last"), "--channels-last")
    assert channels_last["train_loss"] == pytest.approx(default["train_loss"], rel=2e-3)
    assert channels_last["val_loss"] == pytest.approx(default["val_loss"], rel=2e-3)
    weights = [load_checkpoint_file(tmp_path / run / "checkpoint.pth")["model"]
               for run in ("default", "channels_last")]
    net = timm.create_model("lsnet_t_artist", num_classes=4, feature_dim=32)
    for name, _ in net.named_parameters():  # BatchNorm running statistics amplify the rounding further
        # AdamW moves a weight by up to lr per step whatever the gradient size: at most 4 x 1.6e-5 here
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-3, atol=2e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert weights[1]["patch_embed.0.c.weight"].is_contiguous(memory_format=torch.channels_last)
    load_checkpoint(tmp_path / "channels_last" / "checkpoint.pth", net)


def test_resume_gives_the_same_weights(small_data, tmp_path):
    """2 epochs in one run == 1 epoch, then --resume for the second (augmentation, mixup, drop path, repeated
    augmentation, accumulation and EMA all on: every random stream is restored)."""
    common = ["--data-path", str(small_data), "--batch-size", "4", "--accumulation-steps", "2", "--drop-path", "0.1",
              "--lr", "0.5", "--model-ema-decay", "0.9"]
    first, straight, resumed = train_straight_and_resumed(run_main, common, tmp_path)
    assert straight["epoch"] == resumed["epoch"] == 1
    assert not torch.equal(first["model"]["head.l.weight"], resumed["model"]["head.l.weight"])
    for key in ("model", "model_ema", "optimizer", "rng_states"):
        assert_same_tensors(straight[key], resumed[key], key)
    straight_log, resumed_log = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    for a, b in zip(straight_log, resumed_log, strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


def test_interrupted_checkpoint_save_keeps_the_previous_one(small_data, tmp_path, monkeypatch):
    common = ["--data-path", str(small_data), "--output-dir", str(tmp_path), "--batch-size", "4", "--no-model-ema",
              *NO_AUG]
    run_main(*common, "--epochs", "1")
    log_before = (tmp_path / "train_log.txt").read_text()

    def killed_while_writing(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        run_main(*common, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth"))
    monkeypatch.undo()
    assert load_checkpoint_file(tmp_path / "checkpoint.pth")["epoch"] == 0
    assert (tmp_path / "train_log.txt").read_text() == log_before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_finetune_from_resets_heads_and_pretrained_loads_the_backbone(small_data, tmp_path):
    def create(*argv: str):
        args = train_artist_style.get_args_parser().parse_args([*FAST, "--data-path", str(small_data), *argv])
        return create_model(TrainConfig.from_args(args).model, num_classes=4, seed=0)

    other = timm.create_model("lsnet_t_artist", num_classes=7, feature_dim=32)
    torch.save({"model": other.state_dict()}, tmp_path / "seven.pth")
    net = create("--finetune-from", str(tmp_path / "seven.pth"))
    assert net.head.l.weight.shape == (4, 32)
    assert torch.equal(net.projection[0].l.weight, other.projection[0].l.weight)
    assert torch.equal(net.blocks4[2].ffn.m.pw1.c.weight, other.blocks4[2].ffn.m.pw1.c.weight)

    official = timm.create_model("lsnet_t_distill")  # official ImageNet layout: 1000 classes, two heads
    torch.save({"model": official.state_dict()}, tmp_path / "lsnet_t.pth")
    net = create("--pretrained", str(tmp_path / "lsnet_t.pth"))
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith(("head", "projection"))}
    assert len(backbone) > 500
    for key, value in backbone.items():
        assert torch.equal(value, official.state_dict()[key]), key
    assert net.head.l.weight.shape == (4, 32) and not hasattr(net, "head_dist")


def test_torchrun_two_processes_then_resume_on_one(small_data, tmp_path):
    output_dir = tmp_path / "ddp"
    common = ["--data-path", str(small_data), "--output-dir", str(output_dir), "--batch-size", "4", "--dist-eval",
              "--accumulation-steps", "2", "--lr", "1.0", *NO_AUG]
    result = run_script(*common, "--epochs", "1",
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "distributed: 2 processes, backend gloo" in result.stdout
    assert result.stdout.count("Epoch 1/1:") == 1  # only rank 0 prints
    assert {p.name for p in output_dir.iterdir() if not p.name.startswith("report_")} == {
        "checkpoint.pth", "model_best.pth", "class_mapping.csv", "train_log.txt", "tensorboard", "args.json",
        "config.json", "report.html"}
    assert len(list((output_dir / "tensorboard").iterdir())) == 1
    assert len(read_log(output_dir)) == 1
    checkpoint = load_checkpoint_file(output_dir / "checkpoint.pth")
    assert len(checkpoint["rng_states"]) == 2 and checkpoint["args"]["world_size"] == 2

    run_main(*common, "--epochs", "2", "--resume", str(output_dir))
    assert [r["epoch"] for r in read_log(output_dir)] == [1, 2]


def save_model(path: Path, name: str = "lsnet_t_artist", num_classes: int = 4, **extra) -> Path:
    net = timm.create_model(name, num_classes=num_classes, feature_dim=32)
    torch.save({"model": net.state_dict(), **extra}, path)
    return path


@pytest.mark.parametrize("case, argv, message", [
    ("no_train", ["--data-path", "{tmp}/empty"], r"train not found: --data-path must hold train/ and val/"),
    ("no_val", ["--data-path", "{tmp}/no_val"], r"val not found"),
    ("empty_class", ["--data-path", "{tmp}/empty_class"], r"1 classes have no readable image .*: orange"),
    ("model", ["--model", "lsnet_q_artist"], r"unknown --model 'lsnet_q_artist'; use one of lsnet_t_artist"),
    ("resume_missing", ["--resume", "{tmp}/nothing.pth"], r"checkpoint not found: .*nothing.pth"),
    ("resume_other_arch", ["--resume", "{tmp}/s.pth"], r"the weights look like lsnet_s_artist: pass --model"),
    ("resume_weights_only", ["--resume", "{tmp}/weights.pth"], r"no training state .* --finetune-from"),
    ("num_classes", ["--num-classes", "5"], r"--num-classes 5 but .* has 4 classes"),
    ("teacher_classes", ["--distillation-type", "hard", "--teacher-model", "lsnet_t_artist", "--teacher-path",
                         "{tmp}/teacher7.pth"], r"teacher .* has 7 classes but the dataset has 4"),
    ("no_teacher", ["--distillation-type", "soft"], r"needs --teacher-model NAME and --teacher-path"),
])
def test_clear_errors(case, argv, message, small_data, tmp_path):
    if case == "no_train":
        (tmp_path / "empty").mkdir()
    elif case == "no_val":
        shutil.copytree(small_data / "train", tmp_path / "no_val" / "train")
    elif case == "empty_class":
        shutil.copytree(small_data, tmp_path / "empty_class")
        (tmp_path / "empty_class" / "train" / "orange").mkdir()
    elif case == "resume_other_arch":
        save_model(tmp_path / "s.pth", "lsnet_s_artist", optimizer={}, epoch=0)
    elif case == "resume_weights_only":
        save_model(tmp_path / "weights.pth")
    elif case == "teacher_classes":
        save_model(tmp_path / "teacher7.pth", num_classes=7)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--data-path" not in argv:
        argv += ["--data-path", str(small_data)]
    with pytest.raises(UserError, match=message):
        run_main("--output-dir", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "4", *argv)


def test_distillation_trains_a_second_head_and_evaluates_without_teacher(small_data, tmp_path):
    teacher = save_model(tmp_path / "teacher.pth")
    common = ["--data-path", str(small_data), "--output-dir", str(tmp_path / "run"), "--batch-size", "4",
              "--no-model-ema", *NO_AUG, "--distillation-type", "soft"]
    run_main(*common, "--epochs", "1", "--teacher-model", "lsnet_t_artist", "--teacher-path", str(teacher))
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pth").distillation
    assert json.loads((tmp_path / "run" / "config.json").read_text())["distillation"]
    results = run_main(*common, "--eval", "--resume", str(tmp_path / "run"))
    assert results["model"]["acc1"] == read_log(tmp_path / "run")[-1]["val_acc1"]


def test_command_line_errors_are_one_line(tmp_path):
    result = run_script("--data-path", str(tmp_path), "--model", "resnet50")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: unknown --model 'resnet50'; use one of lsnet_t_artist, lsnet_s_artist, lsnet_b_artist, "
        "lsnet_l_artist, lsnet_xl_artist, lsnet_xl_artist_448"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(small_data):
    with pytest.raises(UserError, match="--device cuda but no CUDA GPU is usable"):
        run_main("--data-path", str(small_data), "--device", "cuda")


def test_pretrained_alone_uses_the_hub_cache_and_pretrained_path_a_local_file(small_data, tmp_path, offline_hub):
    def create(*argv: str):
        args = train_artist_style.get_args_parser().parse_args([*FAST, "--data-path", str(small_data), *argv])
        return create_model(TrainConfig.from_args(args).model, num_classes=4, seed=0)

    with pytest.raises(UserError, match="huggingface-cli download jameslahm/lsnet_t") as err:
        create("--pretrained")  # nothing cached and no network: one line saying what to download
    assert "\n" not in str(err.value)
    official = timm.create_model("lsnet_t")
    offline_hub("jameslahm/lsnet_t", {"model": official.state_dict()})
    local = timm.create_model("lsnet_t_distill")
    torch.save({"model": local.state_dict()}, tmp_path / "lsnet_t_distill.pth")
    for argv, source in ((["--pretrained"], official), (["--pretrained-path", str(tmp_path / "lsnet_t_distill.pth")],
                                                       local)):
        net = create(*argv)
        backbone = [k for k in net.state_dict() if not k.startswith(("head", "projection"))]
        assert len(backbone) > 500, argv
        assert all(torch.equal(net.state_dict()[k], source.state_dict()[k]) for k in backbone), argv
        assert net.head.l.weight.shape == (4, 32)
