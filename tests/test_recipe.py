"""The training recipe (choices per data / run shape, explicit flags win, stored and kept on resume), --lr-abs,
--layer-decay, --patience and the end-of-run report."""

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_multilabel_train import make_mixed_set

import model  # noqa: F401  (registers the LSNet models)
import train_artist_multilabel
import train_artist_style
from artifacts.run_folder import Best, ResumePoint
from training.config import TrainConfig
from training.early_stopping import EarlyStopping
from training.factory import build_optimizer, scale_lr
from training.recipe import DataShape, Recipe, RunShape, apply_recipe, choose_recipe, prepare_recipe, recipe_block
from training.report import MAX_MATRIX_CLASSES, PER_CLASS_FILE, Predictions, tail_summary, write_report

FAST = ["--device", "cpu", "--model", "lsnet_t_artist", "--input-size", "64", "--feature-dim", "32",
        "--num-workers", "0", "--print-freq", "100", "--batch-size", "8"]
SMALL = DataShape(images=240, classes=6, smallest=40, largest=40)


def config(*argv: str) -> TrainConfig:
    return TrainConfig.from_args(train_artist_style.get_args_parser().parse_args(["--data-path", "x", *argv]))


def test_small_short_run_from_scratch():
    """A newcomer's run (issue 13): usable absolute LR, a one-epoch warm-up (rising per step), no cool-down, no
    repeated augmentation, no mixing or erasing in 15 epochs, an EMA sized to ~200 steps."""
    recipe = choose_recipe("auto", SMALL, RunShape(epochs=15, batch_size=16))
    s = recipe.settings
    assert recipe.name == "scratch" and "random weights" in recipe.why
    assert s["lr_abs"] == pytest.approx(4e-3) and s["warmup_epochs"] == 1 and s["cooldown_epochs"] == 0
    assert s["repeated_aug"] is False and s["mixup"] == s["cutmix"] == s["reprob"] == 0
    assert s["weight_decay"] == 0.025 and 0.9 <= s["model_ema_decay"] < 0.99
    assert choose_recipe("auto", SMALL, RunShape(epochs=15, batch_size=4)).settings["lr_abs"] == pytest.approx(2e-3)
    assert all(choice.reason for choice in recipe.choices.values())


def test_the_recipe_chooses_the_batch_only_when_none_is_given():
    """Issue 24: 131 training images with no --batch-size train at 32 (3+ batches per epoch), not DeiT's 256."""
    newcomer = DataShape(images=131, classes=12, smallest=4, largest=21)
    for data, world_size, expected in ((newcomer, 1, 32), (newcomer, 2, 16), (SMALL, 1, 64),
                                       (DataShape(126, 12, 4, 21), 1, 32),
                                       (DataShape(10, 2, 5, 5), 1, 8), (DataShape(10**6, 1000, 5, 5000), 4, 256)):
        choice = choose_recipe("auto", data, RunShape(epochs=30, batch_size=None, world_size=world_size))
        assert choice.choices["batch_size"].value == expected and "batches per epoch" in choice.choices[
            "batch_size"].reason
    assert choose_recipe("imagenet", SMALL, RunShape(epochs=30, batch_size=None)).settings == {"batch_size": 64}
    assert "batch_size" not in choose_recipe("auto", newcomer, RunShape(epochs=30, batch_size=64)).settings
    chosen = apply_recipe(config(), choose_recipe("auto", newcomer, RunShape(epochs=30, batch_size=None)))
    assert chosen.optim.batch_size == 32 and config().optim.batch_size is None
    assert config("--eval", "--resume", __file__).optim.batch_size == 256  # --eval: no recipe, DeiT's batch
    assert apply_recipe(config("--batch-size", "4"), choose_recipe("auto", newcomer, RunShape(30, None))).optim \
        .batch_size == 4
    # the other choices follow the chosen batch: the LR of batch 32 (x sqrt(16 / 16) capped), steps of batch 32
    assert choose_recipe("auto", newcomer, RunShape(30, None)).settings["lr_abs"] == pytest.approx(4e-3)


def test_a_run_from_before_batch_choices_resumes_at_its_own_batch(tmp_path):
    """A checkpoint whose recipe chose no batch (older runs) continues at the batch in its args, not at None."""
    old_recipe = {"name": "scratch", "why": "auto", "settings": {"lr_abs": {"value": 0.004, "reason": "r"}}}
    point = ResumePoint(tmp_path / "checkpoint.pth", {"config": {"recipe": old_recipe}, "args": {"batch_size": 64}})
    cfg, recipe = prepare_recipe(config(), SMALL, 1, resume=point)
    assert cfg.optim.batch_size == 64 and cfg.optim.lr_abs == 0.004 and "batch_size" not in recipe.settings
    older = ResumePoint(tmp_path / "checkpoint.pth", {"config": {"recipe": old_recipe}, "args": {}})
    assert prepare_recipe(config(), SMALL, 1, resume=older)[0].optim.batch_size == 256


def test_small_images_are_trained_at_about_their_own_size():
    """Issue 26: 96 px images upscaled to 224 blur the texture; from scratch they train at 96 (multiple of 32)."""
    run = RunShape(epochs=30, batch_size=32)
    small = DataShape(images=126, classes=12, smallest=4, largest=21, image_side=100)
    choice = choose_recipe("auto", small, run).choices["input_size"]
    assert choice.value == 96 and "100 px" in choice.reason and "224" in choice.reason
    assert choose_recipe("auto", dataclasses.replace(small, image_side=40), run).settings["input_size"] == 64
    for unchanged in (dataclasses.replace(small, image_side=700), dataclasses.replace(small, image_side=None)):
        assert "input_size" not in choose_recipe("auto", unchanged, run).settings
    assert "input_size" not in choose_recipe("auto", small, dataclasses.replace(run, pretrained=True)).settings
    assert apply_recipe(config("--epochs", "30"), choose_recipe("auto", small, run)).model.input_size == 96
    assert apply_recipe(config("--input-size", "160"), choose_recipe("auto", small, run)).model.input_size == 160
    assert "100 px" in small.describe()


def test_short_runs_on_little_data_get_more_passes_per_epoch():
    """Issue 26: 126 images at batch 32 make 90 steps in 30 epochs and underfit; passes per epoch bring the run
    to at least 400 steps (at most 8 passes), and the EMA follows the steps actually taken."""
    small = DataShape(images=126, classes=12, smallest=4, largest=21)
    recipe = choose_recipe("auto", small, RunShape(epochs=30, batch_size=32))
    choice = recipe.choices["epoch_repeats"]
    assert choice.value == 5 and "90 optimizer steps" in choice.reason
    assert recipe.settings["model_ema_decay"] == pytest.approx(1 - 10 / (630 // 32 * 30), abs=1e-6)
    assert choose_recipe("auto", small, RunShape(epochs=10, batch_size=32)).settings["epoch_repeats"] == 8
    assert choose_recipe("auto", small, RunShape(epochs=9, batch_size=32)).settings["epoch_repeats"] == 1
    large = DataShape(images=50_000, classes=100, smallest=500, largest=500)
    assert choose_recipe("auto", large, RunShape(epochs=30, batch_size=32)).settings["epoch_repeats"] == 1
    assert "epoch_repeats" not in choose_recipe("auto", small, RunShape(30, 32, multi_label=True)).settings
    assert apply_recipe(config(), recipe).sampler.epoch_repeats == 5
    assert apply_recipe(config("--epoch-repeats", "2"), recipe).sampler.epoch_repeats == 2


def test_short_runs_keep_the_colours_and_sharpness_that_make_a_style():
    short = choose_recipe("auto", SMALL, RunShape(epochs=30, batch_size=32))
    assert short.settings["aa"] is None and short.settings["color_jitter"] == 0.0
    assert "--aa none because 30 epochs: RandAugment" in recipe_block(short, frozenset(), "x")
    applied = apply_recipe(config(), short)
    assert applied.augment.auto_augment is None and applied.transform.color_jitter == 0.0
    assert not {"aa", "color_jitter"} & choose_recipe("auto", SMALL, RunShape(300, 32)).settings.keys()
    assert not {"aa", "color_jitter"} & choose_recipe("auto", SMALL, RunShape(30, 32, multi_label=True)).settings.keys()
    assert apply_recipe(config("--aa", "rand-m5"), short).augment.auto_augment == "rand-m5"


def test_long_large_multi_gpu_run_comes_back_to_the_imagenet_regime():
    data = DataShape(images=1_200_000, classes=1000, smallest=700, largest=1300)
    s = choose_recipe("auto", data, RunShape(epochs=300, batch_size=256, world_size=8)).settings
    assert s["repeated_aug"] is True and s["warmup_epochs"] == 5 and s["cooldown_epochs"] == 10
    assert (s["mixup"], s["cutmix"], s["reprob"]) == (0.8, 1.0, 0.25) and s["weight_decay"] == 0.025
    assert s["lr_abs"] == pytest.approx(4e-3)  # = LSNet's 1e-3 per 512 at batch 2048
    assert 0.9999 < s["model_ema_decay"] <= 0.99996
    assert choose_recipe("auto", data, RunShape(epochs=300, batch_size=256)).settings["repeated_aug"] is False


def test_pretrained_weights_choose_finetune():
    run = RunShape(epochs=100, batch_size=64)
    scratch = choose_recipe("auto", SMALL, run)
    finetune = choose_recipe("auto", SMALL, RunShape(epochs=100, batch_size=64, pretrained=True))
    assert finetune.name == "finetune" and "pretrained" in finetune.why
    assert finetune.settings["lr_abs"] < scratch.settings["lr_abs"] / 2
    assert finetune.settings["warmup_epochs"] < scratch.settings["warmup_epochs"]
    assert choose_recipe("finetune", SMALL, run).settings == finetune.settings


def test_imagenet_recipe_keeps_every_default():
    cfg = config("--epochs", "15", "--batch-size", "16")
    recipe = choose_recipe("imagenet", SMALL, RunShape(15, 16))
    assert recipe.choices == {}
    applied = apply_recipe(cfg, recipe)
    assert (applied.optim, applied.augment, applied.ema) == (cfg.optim, cfg.augment, cfg.ema)
    assert applied.optim.lr_abs is None and applied.augment.repeated_aug and applied.optim.cooldown_epochs == 10


def test_explicit_flags_win_over_the_recipe():
    cfg = config("--mixup", "0.5", "--lr", "0.5", "--no-model-ema")
    recipe = choose_recipe("auto", SMALL, RunShape(15, 16))
    applied = apply_recipe(cfg, recipe)
    assert applied.augment.mixup == 0.5 and applied.augment.cutmix == 0.0  # given vs chosen
    assert applied.optim.lr_abs is None and applied.optim.lr == 0.5  # --lr given: the recipe's LR is not used
    assert applied.ema.decay < 0.99 and not applied.ema.enabled
    block = recipe_block(recipe, cfg.explicit, "test data")
    assert block.startswith("recipe: scratch for test data because auto:")
    assert "--mixup: your flag wins (the recipe would use 0.0)" in block
    assert "--lr-abs: your flag wins" in block and "--cutmix 0 because" in block


def test_multi_label_leaves_mixing_alone_and_round_trips():
    recipe = choose_recipe("auto", SMALL, RunShape(200, 32, multi_label=True))
    assert not {"mixup", "cutmix", "smoothing"} & recipe.settings.keys()
    back = Recipe.from_dict(json.loads(json.dumps(recipe.as_dict())))
    assert back.settings == recipe.settings and back.name == recipe.name and back.why == recipe.why


def test_lr_abs_and_layer_decay(capsys):
    cfg = config("--lr-abs", "3e-4", "--layer-decay", "0.5", "--batch-size", "16")
    assert scale_lr(cfg.optim, world_size=2) == 3e-4
    assert "learning rate 0.0003 (--lr-abs, used as given" in capsys.readouterr().out
    assert scale_lr(config("--batch-size", "16").optim, 2) == pytest.approx(1e-3 * 32 / 512)
    net = timm.create_model("lsnet_t_artist", num_classes=3)
    optimizer = build_optimizer(net, cfg.optim, 3e-4)
    scales = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scales[id(param)] = group["lr_scale"]
    by_name = {name: scales[id(p)] for name, p in net.named_parameters()}
    assert by_name["head.l.weight"] == 1.0 and by_name["patch_embed.0.c.weight"] == pytest.approx(0.5 ** 4)
    assert sorted(set(by_name.values())) == pytest.approx([0.5 ** k for k in (4, 3, 2, 1, 0)])


def test_early_stopping_counts_validations_since_the_best():
    stop = EarlyStopping(2)
    assert not stop.update({"epoch": 1, "val_acc1": 50}, Best(50, "model", 1))
    assert not stop.update({"epoch": 2, "train_loss": 1.0}, Best(50, "model", 1))  # not validated: not counted
    assert not stop.update({"epoch": 3, "val_acc1": 40}, Best(50, "model", 1))
    assert stop.update({"epoch": 4, "val_acc1": 45}, Best(50, "model", 1)) and stop.stopped
    assert not EarlyStopping(0).update({"epoch": 9, "val_acc1": 1}, Best(50, "model", 1))


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def read_page(folder: Path) -> _Page:
    page = _Page()
    page.feed((folder / "report.html").read_text(encoding="utf-8"))
    for name in page.images:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 50, name
    return page


RECORDS = [{"epoch": e, "lr": 1e-3 / e, "train_loss": 2 / e, "val_loss": 2.2 / e, "val_acc1": 30.0 * e}
           for e in (1, 2, 3)]


def test_report_with_many_classes_lists_the_confused_pairs(tmp_path):
    """Over 50 classes: no matrix picture, the most confused pairs are listed instead."""
    n = MAX_MATRIX_CLASSES + 2
    names = [f"artist_{i}" for i in range(n)]
    targets = np.repeat(np.arange(n), 2)
    scores = np.full((2 * n, n), 0.1 / n)
    scores[np.arange(2 * n), targets] = 0.9
    scores[0, 0], scores[0, 7] = 0.0, 0.95  # one image of artist_0 taken for artist_7
    write_report(tmp_path, RECORDS, names, Predictions.from_scores(scores, targets), "acc1", "best acc1: epoch 3")
    page = read_page(tmp_path)
    assert "report_confusion.png" not in page.images and not (tmp_path / "report_confusion.png").exists()
    assert {"report_loss.png", "report_metric.png", "report_lr.png", "report_per_class.png"} <= set(page.images)
    text = " ".join(page.text)
    assert "Most confused pairs" in text and "artist_0 artist_7 1" in " ".join(text.split())


def test_report_shows_recall_against_training_images_per_artist(tmp_path):
    """The long tail at a glance: macro recall beside top-1, the fewest-image artists' recall, the per-artist CSV."""
    names = ["head", "middle", "tail", "unseen"]
    targets = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 0, 1, 0, 0, 0])  # head 4/4, middle 1/2, tail 0/2; "unseen" has no val image
    scores = np.eye(4)[predicted]
    preds = Predictions.from_scores(scores, targets)
    line = tail_summary(preds, names, [30, 12, 5, 3])
    assert line.startswith("validation of the best weights: top-1 0.625, macro recall 0.500;")
    assert "fewest training images: tail 0.00 (5 training images), middle 0.50 (12 training images), head 1.00" in line
    assert line.endswith("lowest recall 0.00")
    assert tail_summary(preds, names, None).endswith("macro recall 0.500")
    write_report(tmp_path, RECORDS, names, preds, "acc1", "best acc1: epoch 3", train_counts=[30, 12, 5, 3])
    assert (tmp_path / PER_CLASS_FILE).read_text().splitlines() == [
        "artist,train_images,val_images,recall", "head,30,4,1.0000", "middle,12,2,0.5000", "tail,5,2,0.0000",
        "unseen,3,0,"]
    page = read_page(tmp_path)
    assert "report_tail.png" in page.images and "macro recall 0.500" in " ".join(page.text)


@pytest.mark.slow
def test_auto_recipe_run_records_it_stops_early_and_reports(tmp_path):
    data = make_colour_data(tmp_path / "data")
    out = tmp_path / "run"
    with one_thread():
        result = train_artist_style.main(train_artist_style.get_args_parser().parse_args([
            *FAST, "--data-path", str(data), "--output-dir", str(out), "--epochs", "6", "--lr-abs", "0",
            "--patience", "1", "--mixup", "0.4"]))
    assert result["stopped_early"] and result["epoch"] == 2 and result["best"]["epoch"] == 1  # LR 0: no progress
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["name"] == "scratch" and config["recipe"]["settings"]["cutmix"]["value"] == 0.0
    args = json.loads((out / "args.json").read_text())
    assert args["mixup"] == 0.4 and args["cutmix"] == 0.0 and args["repeated_aug"] is False
    assert args["scaled_lr"] == 0.0 and args["model_ema_decay"] < 0.99
    page = read_page(out)
    assert {"report_loss.png", "report_confusion.png", "report_per_class.png"} <= set(page.images)
    assert "best acc1: epoch 1" in " ".join(page.text)


@pytest.mark.slow
def test_resume_keeps_the_recipe(tmp_path, capsys, monkeypatch):
    data = make_colour_data(tmp_path / "data")
    out = tmp_path / "run"
    common = [*FAST, "--data-path", str(data), "--output-dir", str(out)]
    parse = train_artist_style.get_args_parser().parse_args
    reads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    with one_thread():
        train_artist_style.main(parse([*common, "--epochs", "1", "--recipe", "imagenet"]))
        monkeypatch.setattr(torch, "load", counting_load)
        train_artist_style.main(parse([*common, "--epochs", "2", "--resume", str(out)]))  # no --recipe: auto
    assert reads.count("checkpoint.pth") == 1, "a start with --resume reads its checkpoint once"
    assert "(its recipe is kept)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["recipe"]["name"] == "imagenet"
    args = json.loads((out / "args.json").read_text())
    assert args["model_ema_decay"] == 0.99996 and args["repeated_aug"] is True and args["lr_abs"] is None


@pytest.mark.slow
def test_multi_label_uses_the_recipe(tmp_path, capsys):
    data = make_mixed_set(tmp_path / "mixed", num_artists=3, num_mixed=24, num_val=6)
    out = tmp_path / "run"
    with one_thread():
        train_artist_multilabel.main(train_artist_multilabel.get_args_parser().parse_args([
            *FAST, *data, "--output-dir", str(out), "--epochs", "1"]))
    assert "recipe: scratch for " in capsys.readouterr().out
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["settings"]["lr_abs"]["value"] == pytest.approx(2.83e-3) and "mixup" not in recipe["settings"]
    assert json.loads((out / "args.json").read_text())["mixup"] == 0.0
    assert "report_per_class.png" in read_page(out).images


def make_colour_data(root: Path) -> Path:
    """``train/`` (6 per class) + ``val/`` (2 per class) of noisy solid colours, 64 px."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name, colour in {"blue": (30, 60, 220), "red": (220, 40, 30), "green": (30, 200, 60)}.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.array(colour)[None, None] + rng.integers(-30, 30, (64, 64, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


class one_thread:
    """In-process runs with one torch thread (the tests share a small machine)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
