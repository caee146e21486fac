"""The training configuration (flags, --config YAML, TrainConfig) and the run folder contract (artifacts.run_folder)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_artist_multilabel
import train_artist_style
from artifacts.checkpoint import load_checkpoint_file
from artifacts.run_folder import (
    Best,
    ResumePoint,
    RunFolder,
    args_record,
    read_eval_weights,
    read_log_records,
    read_resume_point,
    training_checkpoint,
)
from data import build_transform
from training.config import TrainConfig
from training.loops import train_one_epoch
from training.resume import TrainingState, epoch_seed
from training.trainer import build_training_state
from utils import UserError


def parse(*argv: str, script=train_artist_style):
    return script.get_args_parser().parse_args(["--data-path", "data", "--device", "cpu", *argv])


def test_config_is_built_once_with_model_and_device_defaults():
    cfg = TrainConfig.from_args(parse("--model", "lsnet_xl_artist_448", "--epochs", "7", "--no-model-ema"))
    assert cfg.model.input_size == 448 and cfg.run.amp is False  # from the model; amp off on the CPU
    assert cfg.optim.epochs == 7 and not cfg.ema.enabled and cfg.ema.decay == 0.99996
    assert cfg.explicit == {"model", "epochs", "model_ema", "data_path", "device"}
    assert cfg.transform.input_size == 448 and cfg.multilabel is None and not cfg.distill.enabled
    with pytest.raises(AttributeError):
        cfg.optim.epochs = 3  # frozen
    args = parse("--input-size", "64")
    assert TrainConfig.from_args(args).model.input_size == 64 and args.input_size == 64  # args are not rewritten
    assert parse().input_size is None and TrainConfig.from_args(parse()).model.input_size == 224


@pytest.mark.parametrize("argv, field, expected", [
    (["--no-projection"], ("model", "use_projection"), False),
    (["--use-projection"], ("model", "use_projection"), True),
    (["--no-use-projection"], ("model", "use_projection"), False),
    (["--no-repeated-aug"], ("augment", "repeated_aug"), False),
    (["--no-pin-mem"], ("run", "pin_mem"), False),
    (["--amp"], ("run", "amp"), True),
    (["--ThreeAugment"], ("augment", "three_augment"), True),
    (["--aa", "none"], ("augment", "auto_augment"), None),
    (["--dr", "0.5"], ("optim", "decay_rate"), 0.5),
    (["--output_dir", "x"], ("run", "output_dir"), "x"),
])
def test_flag_spellings(argv, field, expected):
    cfg = TrainConfig.from_args(parse(*argv))
    assert getattr(getattr(cfg, field[0]), field[1]) == expected


def test_config_file_values_are_defaults_that_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 12\nbatch-size: 32\nmodel_ema: false\nlr: 0.5\n")
    cfg = TrainConfig.from_args(parse("--config", str(path), "--epochs", "3"))
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.ema.enabled, cfg.optim.lr) == (3, 32, False, 0.5)
    assert {"epochs", "batch_size", "model_ema", "lr"} <= cfg.explicit
    assert TrainConfig.from_args(parse()).optim.epochs == 300  # the file changed no default for later parses
    (tmp_path / "ml.yaml").write_text(f"train-ann: {tmp_path / 't.csv'}\nval_ann: v.csv\nthreshold: 0.6\n")
    ml = TrainConfig.from_args(parse("--config", str(tmp_path / "ml.yaml"), script=train_artist_multilabel))
    assert ml.multilabel.val_ann == "v.csv" and ml.multilabel.threshold == 0.6 and ml.augment.mixup == 0.0
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(SystemExit):
        parse("--config", str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--eval"], "--eval needs --resume"),
    (["--pretrained", "a.pth", "--finetune-from", "b.pth"], "pass only one"),
])
def test_config_errors(argv, message):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_args(parse(*argv))


def test_run_folder_round_trip(tmp_path):
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".checkpoint.pth.abc.tmp").write_bytes(b"stale")
    args = args_record({"epochs": 2, "opt_betas": (0.9, 0.99), "seed": 1}, world_size=1, scaled_lr=0.01)
    folder.start(["a", "b"], resuming=False, args=args, config={"model": "m"})
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    records = []
    for epoch, best in ((0, Best(50.0, "model", 1)), (1, Best(75.0, "model_ema", 2))):
        state = training_checkpoint(
            model=net.state_dict(), optimizer=optimizer.state_dict(), lr_scheduler={}, scaler=None, epoch=epoch,
            best=best, best_key="acc1", args=args, class_names=["a", "b"], config={"model": "m"}, rng_states=[{}],
            model_ema={k: v + 1 for k, v in net.state_dict().items()})
        records.append({"epoch": epoch + 1, "lr": 0.1, "train_loss": 1.0 / (epoch + 1), "val_acc1": best.metric})
        folder.save_epoch(state, records[-1], improved=best.source, save_every=2)
    folder.close()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "checkpoint.pth", "checkpoint_epoch2.pth",
                                                     "class_mapping.csv", "config.json", "model_best.pth",
                                                     "tensorboard", "train_log.txt"]
    assert read_log_records(run) == records and read_log_records(tmp_path) == []
    assert json.loads((run / "args.json").read_text())["opt_betas"] == [0.9, 0.99]
    best = load_checkpoint_file(run / "model_best.pth")
    assert best["best_source"] == "model_ema" and torch.equal(best["model"]["bias"], net.bias.detach() + 1)

    point = read_resume_point(run / "checkpoint.pth")
    point.check_classes(["a", "b"])
    assert point.epoch == 1 and point.best == Best(75.0, "model_ema", 2) and point.args["scaled_lr"] == 0.01
    assert point.has_ema and torch.equal(point.weights(ema=True).state_dict["bias"], net.bias.detach() + 1)
    assert set(read_eval_weights(run / "checkpoint.pth", ["a", "b"])) == {"model", "model_ema"}
    with pytest.raises(UserError, match="classes of .* differ from the dataset's"):
        point.check_classes(["a", "c"])
    with pytest.raises(UserError, match="differs from the dataset's classes"):
        RunFolder(run).start(["a", "c"], resuming=True, args=args, config={})


def test_resume_follows_changed_schedule_flags(capsys):
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    optimizer.step()
    scheduler.step()
    point_raw = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "epoch": 0,
                 "model": net.state_dict(), "args": {"epochs": 5, "scaled_lr": 0.1}}
    point = ResumePoint(path=Path("c.pth"), raw=point_raw)
    fresh = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(net.parameters(), lr=0.1), 1)
    TrainingState(torch.optim.SGD(net.parameters(), lr=0.1), fresh).restore(point, {"epochs": 5, "scaled_lr": 0.1})
    assert fresh.last_epoch == 1
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(net.parameters(), lr=0.1), 1)
    TrainingState(torch.optim.SGD(net.parameters(), lr=0.1), other).restore(point, {"epochs": 9, "scaled_lr": 0.1})
    assert other.last_epoch == 0 and "--epochs changed since the checkpoint" in capsys.readouterr().out
    assert Best().metric == -math.inf and epoch_seed(0, 1, 0) != epoch_seed(0, 0, 1)


def test_training_state_from_config():
    cfg = TrainConfig.from_args(parse("--opt", "sgd", "--sched", "step", "--no-model-ema", "--weight-decay", "0.1"))
    state = build_training_state(torch.nn.Linear(2, 2), cfg, lr=0.5, device=torch.device("cpu"))
    assert type(state.optimizer).__name__ == "SGD" and type(state.scheduler).__name__ == "StepLRScheduler"
    assert state.optimizer.param_groups[0]["initial_lr"] == 0.5 and state.ema is None and state.scaler is None
    with_ema = build_training_state(torch.nn.Linear(2, 2), TrainConfig.from_args(parse()), 0.1, torch.device("cpu"))
    assert with_ema.ema is not None and with_ema.ema.decay == 0.99996
    with pytest.raises(UserError, match="use a timm optimizer"):
        build_training_state(torch.nn.Linear(2, 2), TrainConfig.from_args(parse("--opt", "nope")), 0.1,
                             torch.device("cpu"))


def test_the_learning_rate_schedule_steps_at_every_optimizer_step():
    """Issue 24: a 2-epoch warm-up over 5 optimizer steps per epoch rises at each step (not an epoch at 1e-6); the
    training loop reports every optimizer step, accumulation included."""
    cfg = TrainConfig.from_args(parse("--warmup-epochs", "2", "--warmup-lr", "0", "--epochs", "10",
                                      "--cooldown-epochs", "0", "--no-model-ema"))
    net = torch.nn.Linear(2, 2)
    state = build_training_state(net, cfg, lr=0.1, device=torch.device("cpu"), updates_per_epoch=5)
    rates = []
    for update in range(1, 11):
        state.scheduler.step_update(update)
        rates.append(state.optimizer.param_groups[0]["lr"])
    assert rates[:9] == pytest.approx([0.01 * step for step in range(1, 10)])  # 0 -> 0.1 over 10 steps
    assert 0.09 < rates[9] < 0.1  # then the cosine decay
    data = torch.utils.data.TensorDataset(torch.randn(7, 2), torch.tensor([0, 1] * 3 + [0]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    seen = []
    train_one_epoch(net, torch.nn.CrossEntropyLoss(), loader, state.optimizer, torch.device("cpu"), 0,
                    accumulation_steps=3, on_update=seen.append)
    assert seen == [1, 2]  # 4 micro-batches in groups of 3: two optimizer steps


def test_crop_scale_bounds_the_training_crops():
    """--crop-scale (issue 26): the training's random resized crops keep at least that share of the image area
    (timm's 0.08 by default); out of (0, 1] is one clear error."""
    assert TrainConfig.from_args(parse()).augment.crop_scale == 0.08
    cfg = TrainConfig.from_args(parse("--crop-scale", "0.5", "--input-size", "64"))
    crop = build_transform(True, cfg.transform).transforms[0]
    random.seed(0)  # timm's crop draws from Python's random
    shares = [math.prod(crop.get_params(Image.new("RGB", (96, 96)), crop.scale, crop.ratio)[2:]) / 96 ** 2
              for _ in range(200)]
    assert 0.49 <= min(shares) < 0.6 and max(shares) > 0.9  # 0.49: crop sides are whole pixels
    with pytest.raises(UserError, match="--crop-scale"):
        TrainConfig.from_args(parse("--crop-scale", "0"))
