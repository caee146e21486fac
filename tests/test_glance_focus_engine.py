"""train_glance_focus.py on the shared training engine: its settings (--config, ranges, the --workers alias), the
divergence guard, train_log.txt with a stage field and a report.html per stage."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import train_glance_focus
from artifacts.checkpoint import load_checkpoint_file
from gfnet.config import GlanceFocusConfig, StageConfig, get_args_parser
from gfnet.stages import run_stage
from model.glance_focus import create_glance_focus
from training.distributed import DistEnv
from utils import UserError, run_cli


def _config(*flags: str) -> GlanceFocusConfig:
    return GlanceFocusConfig.from_args(get_args_parser().parse_args(list(flags)))


def test_config_file_sets_glance_focus_settings_and_flags_win(tmp_path):
    yaml = tmp_path / "gf.yaml"
    yaml.write_text("data-path: data\noutput_dir: runs/gf\nglance_size: 48\nepochs: [3, 1, 2]\nppo-epochs: 2\n"
                    "batch_size: 8\n")
    cfg = _config("--config", str(yaml), "--batch-size", "4", "--device", "cpu")
    assert (cfg.work.data_path, cfg.work.output_dir, cfg.views.glance_size) == ("data", "runs/gf", 48)
    assert cfg.stages.epochs == (3, 1, 2) and cfg.ppo.ppo_epochs == 2 and cfg.stages.batch_size == 4
    assert cfg.stage(3, DistEnv()).epochs == 2 and cfg.stage(3, DistEnv()).lr == pytest.approx(cfg.stages.lr / 10)
    assert {"glance_size", "batch_size", "data_path"} <= cfg.explicit
    assert cfg.settings()["glance_size"] == 48 and cfg.settings()["num_workers"] == cfg.work.num_workers


def test_workers_is_an_alias_of_num_workers():
    base = ("--data-path", "d", "--output-dir", "o", "--device", "cpu")
    assert _config(*base, "--workers", "0").work.num_workers == 0
    assert _config(*base, "--num-workers", "3").work.num_workers == 3


@pytest.mark.parametrize("flags, expected", [
    (["--glance-size", "16"], "error: --glance-size must be at least 32, got 16"),
    (["--config", "{yaml}"], "error: --focus-steps must be at least 1, got 0"),
])
def test_out_of_range_setting_is_one_line(tmp_path, capsys, flags, expected):
    (tmp_path / "gf.yaml").write_text("focus_steps: 0\n")
    argv = ["--data-path", str(tmp_path), "--output-dir", str(tmp_path / "gf"), "--device", "cpu",
            *[flag.format(yaml=tmp_path / "gf.yaml") for flag in flags]]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train_glance_focus.main(get_args_parser().parse_args(argv)))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.strip().splitlines() == [expected], err
    assert not (tmp_path / "gf").exists()


def _tiny_loader(classes: int = 4) -> DataLoader:
    torch.manual_seed(0)
    samples = [((torch.randn(3, 64, 64), torch.randn(3, 64, 64)), label) for label in range(classes)]
    return DataLoader(samples, batch_size=classes, sampler=DistributedSampler(samples, num_replicas=1, rank=0))


def test_guard_stops_a_diverged_stage_epoch_before_it_is_saved(tmp_path):
    """On resume the guard compares an epoch with the first epoch of the same stage (the first record of another
    stage does not count): an epoch whose loss is over 1000x it stops the stage before it is saved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = create_glance_focus("lsnet_t_gf", num_classes=4, glance_size=64, patch_size=32, focus_steps=1)
        loader, logs = _tiny_loader(), []
        run_stage(model, 1, loader, StageConfig(epochs=1, lr=1e-3), tmp_path, log=logs.append)
        (record,) = [json.loads(line) for line in (tmp_path / "train_log.txt").read_text().splitlines()]
        assert record["stage"] == 1 and record["train_loss"] > 1.0  # about ln 4 = 1.39
        # as if stage 1's first epoch had ended at loss 1e-6 (and stage 2 had logged a loss of 5 before it)
        records = [{"stage": 2, "epoch": 1, "train_loss": 5.0}, {**record, "train_loss": 1e-6}]
        (tmp_path / "train_log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
        with pytest.raises(UserError, match=r"^epoch 2 diverged \(train loss .*over 1000 x the first epoch's 1e-06.*"
                           r"this epoch was not saved.*lower --lr \(stage 2: --policy-lr\)"):
            run_stage(model, 1, loader, StageConfig(epochs=2, lr=1e-3), tmp_path, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint_file(tmp_path / "stage1.pth")["record"]["epoch"] == 1  # epoch 2 was not saved
