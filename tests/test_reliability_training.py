"""Training fails cleanly (issue 14): a diverged epoch is never saved, a full disk is found before the first epoch or
is a one-line error that keeps the previous checkpoint, one class is refused, bad numbers are refused at parse time,
--resume falls back to the newest loadable checkpoint, and a non-checkpoint file is called one."""

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from test_train import NO_AUG, make_dataset, run_main, train_artist_style

from artifacts import run_folder
from artifacts.checkpoint import load_checkpoint_file, save_checkpoint_atomic
from artifacts.run_folder import append_log_record, checkpoint_sizes
from training.config import TrainConfig
from training.resume import open_resume
from utils import UserError


def strict_json(text: str):
    """``json.loads`` that refuses the bare NaN / Infinity of Python's default encoder."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), train_per_class=4, val_per_class=1, size=32)


COMMON = ["--batch-size", "8", "--no-model-ema", *NO_AUG]


@pytest.mark.slow
def test_diverged_epoch_is_not_saved_and_the_stop_names_the_last_good_epoch(tiny_data, tmp_path):
    """Epoch 1 warms up at a sane rate (plateau: stepped per epoch); epoch 2 runs at --lr 1e6 and explodes: nothing of
    it reaches the folder."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"(epoch 2 diverged|loss is (nan|inf) at epoch 2).*the last good epoch is 1"):
        run_main("--data-path", str(tiny_data), "--output-dir", str(out), "--epochs", "2", *COMMON,
                 "--lr", "1e6", "--warmup-epochs", "1", "--warmup-lr", "1e-4", "--sched", "plateau")
    assert load_checkpoint_file(out / "checkpoint.pth")["epoch"] == 0
    best = load_checkpoint_file(out / "model_best.pth")
    assert best["epoch"] == 0 and all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())
    assert [r["epoch"] for r in map(strict_json, (out / "train_log.txt").read_text().splitlines())] == [1]


@pytest.mark.slow
def test_first_epoch_diverging_saves_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"epoch 1|at epoch 1.*no epoch was saved"):
        run_main("--data-path", str(tiny_data), "--output-dir", str(out), "--epochs", "1", *COMMON, "--lr", "1e6",
                 "--warmup-epochs", "0")
    assert not (out / "checkpoint.pth").exists() and not (out / "model_best.pth").exists()


def test_log_records_are_strict_json(tmp_path):
    append_log_record(tmp_path, {"epoch": 1, "train_loss": float("nan"), "val_loss": float("inf"), "val_acc1": 25.0})
    assert strict_json((tmp_path / "train_log.txt").read_text()) == {
        "epoch": 1, "train_loss": None, "val_loss": None, "val_acc1": 25.0}


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()[:80]}); the ENOSPC path is tested "
                    "by test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_file")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_full_disk_is_found_before_training_and_a_failed_save_keeps_the_previous_checkpoint(tiny_data, tmp_path,
                                                                                            capsys):
    common = ["--data-path", str(tiny_data), *COMMON, "--lr", "0.01"]
    with tmpfs(tmp_path / "small", 8 * 2**20) as small:  # not even one epoch's checkpoints (about 180 MB)
        with pytest.raises(UserError, match=r"small/run has 8 MB free, but saving an epoch needs about 1\d\d MB"):
            run_main(*common, "--output-dir", str(small / "run"), "--epochs", "1")
        assert not list((small / "run").glob("*.pth"))
    net = timm.create_model("lsnet_t_artist", num_classes=4, feature_dim=32)
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())  # checkpoint.pth ~3x, best ~1x
    with tmpfs(tmp_path / "six", 6 * weights) as six:  # one epoch fits, a second copy of checkpoint.pth does not
        with pytest.raises(UserError) as stop:
            run_main(*common, "--output-dir", str(six / "run"), "--epochs", "2")
        assert "two checkpoints need" in capsys.readouterr().out
        message = str(stop.value)
        assert message.startswith(f"cannot write {six / 'run' / 'checkpoint.pth'}: No space left on device")
        assert "the previous checkpoint.pth is intact" in message and "\n" not in message
        assert load_checkpoint_file(six / "run" / "checkpoint.pth")["epoch"] == 0
        assert not [p.name for p in (six / "run").iterdir() if p.name.endswith(".tmp")]


def test_save_every_snapshots_count_in_the_free_space_warning(tiny_data, tmp_path, monkeypatch, capsys):
    """Room for checkpoint.pth and model_best.pth twice over plus one snapshot: --save-every 1 over 2 epochs is
    warned about before training, naming the snapshots; resumed to 3 epochs (one more snapshot) it is not."""
    net = timm.create_model("lsnet_t_artist", num_classes=4, feature_dim=32)
    checkpoint, best = checkpoint_sizes(net, ema=False)
    free = 2 * (checkpoint + best) + checkpoint
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free * 4, 0, free))
    common = [*COMMON, "--data-path", str(tiny_data), "--output-dir", str(tmp_path / "run"), "--lr", "0.01",
              "--save-every", "1", "--feature-dim", "32"]
    run_main(*common, "--epochs", "2")
    assert "the 2 checkpoint_epochN.pth files that --save-every keeps" in capsys.readouterr().out
    run_main(*common, "--epochs", "3", "--resume", str(tmp_path / "run"))
    assert "--save-every keeps" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint_epoch*.pth")) == [
        f"checkpoint_epoch{n}.pth" for n in (1, 2, 3)]


@pytest.mark.parametrize("code, text", [(28, "No space left on device"), (30, "Read-only file system"),
                                        (13, "Permission denied")])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, code, text):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint_atomic({"model": {"w": torch.ones(3)}, "epoch": 4}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise OSError(code, text)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UserError, match=rf"^cannot write {path}: {text}; .*\(the previous checkpoint.pth is intact\)$"):
        save_checkpoint_atomic({"model": {"w": torch.zeros(3)}, "epoch": 5}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["epoch"] == 4 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_single_class_is_refused(tmp_path):
    data = tmp_path / "one"
    for split in ("train", "val"):
        (data / split / "only").mkdir(parents=True)
    make_dataset(tmp_path / "src", 2, 1, size=16)
    for split in ("train", "val"):
        for image in (tmp_path / "src" / split / "red").iterdir():
            image.rename(data / split / "only" / image.name)
    with pytest.raises(UserError, match=r"has 1 class: a classifier needs at least 2.*add another artist"):
        run_main("--data-path", str(data), "--output-dir", str(tmp_path / "run"), "--epochs", "1", *COMMON)


def parse(*argv: str):
    return train_artist_style.get_args_parser().parse_args(["--data-path", "d", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "0"], "--input-size must be at least 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "0"], "--lr must be above 0, got 0.0"),
    (["--smoothing", "1"], r"--smoothing must be in \[0, 1\), got 1.0"),
    (["--reprob", "-0.1"], r"--reprob must be in \[0, 1\], got -0.1"),
    (["--opt-betas", "0.9", "1.5"], r"--opt-betas must be in \[0, 1\), got 1.5"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0, got -1"),
    (["--model-ema-decay", "inf"], "--model-ema-decay must be a finite number, got inf"),
])
def test_numeric_flags_are_checked_before_anything_runs(argv, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        TrainConfig.from_args(parse(*argv))


def test_numeric_settings_of_a_config_file_are_checked_too(tmp_path):
    (tmp_path / "run.yaml").write_text("input-size: 0\n")
    with pytest.raises(UserError, match="^--input-size must be at least 1, got 0$"):
        TrainConfig.from_args(parse("--config", str(tmp_path / "run.yaml")))
    (tmp_path / "run.yaml").write_text("epochs: 2.5\n")
    with pytest.raises(UserError, match="^--epochs must be an integer, got 2.5$"):
        TrainConfig.from_args(parse("--config", str(tmp_path / "run.yaml")))


def test_resume_folder_falls_back_to_the_newest_loadable_epoch_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (2, 10):
        save_checkpoint_atomic({"model": {"w": torch.ones(1)}, "optimizer": {}, "epoch": epoch - 1},
                               run / f"checkpoint_epoch{epoch}.pth")
    (run / "checkpoint_epoch11.pth").write_bytes(b"PK\x03\x04 cut short")  # an unreadable newer one
    cfg, point = open_resume(TrainConfig.from_args(parse("--resume", str(run))))
    assert cfg.run.resume == str(run / "checkpoint_epoch10.pth") and point.epoch == 9
    out = capsys.readouterr().out
    assert f"--resume {run}: continuing from {run / 'checkpoint_epoch10.pth'}" in out
    assert "checkpoint.pth is missing" in out and "checkpoint_epoch11.pth is not a readable PyTorch checkpoint" in out
    save_checkpoint_atomic({"model": {"w": torch.ones(1)}, "optimizer": {}, "epoch": 11}, run / "checkpoint.pth")
    assert open_resume(TrainConfig.from_args(parse("--resume", str(run))))[0].run.resume == str(run / "checkpoint.pth")


def test_an_image_passed_as_a_checkpoint_is_not_a_checkpoint(tmp_path):
    from imagegen import noise_image

    image = noise_image(tmp_path / "photo.jpg")
    with pytest.raises(UserError, match=r"photo.jpg is not a checkpoint \(not a PyTorch .pth file\)"):
        load_checkpoint_file(image)


def test_every_numeric_training_flag_has_a_range():
    import train_artist_multilabel
    from training.config import SECTIONS
    from training.settings import declarations

    ranged = {name for section in SECTIONS.values() for _, name, decl in declarations(section) if decl.allowed}
    for script in (train_artist_style, train_artist_multilabel):
        numeric = {action.dest for action in script.get_args_parser()._actions if action.type in (int, float)}
        assert numeric <= ranged, f"declare a range (allowed=) for {sorted(numeric - ranged)}"
        assert len(numeric) > 30
