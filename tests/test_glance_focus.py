"""Glance and focus (model/glance_focus.py, gfnet/): policy, crop geometry, anytime GRU, early exit, FLOPs per step.

Tiny inputs only (crops of 32-64 px, 1-3 focus steps, untrained lsnet_t encoders).
"""

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import model  # noqa: F401  (registers the image models with timm)
import tests.imagegen as gen
import train_glance_focus
from artifacts.checkpoint import save_checkpoint_atomic
from artifacts.glance_focus_folder import init_encoders
from data.glance_views import make_view, read_crop, to_original, to_tensor
from data.images import load_image
from gfnet.config import StageConfig
from gfnet.dataset import build_gf_dataset
from gfnet.stages import parameter_digest, run_stage
from inference.early_exit import (
    budget_curve,
    calibrate_thresholds,
    exit_steps,
    exit_summary,
    threshold_thresholds,
    thresholds_for_budget,
)
from inference.glance_focus_predictor import load_glance_focus
from model.glance_focus import PatchPolicy, create_glance_focus, crop_patches, most_activated_centres
from perf.flop_count import count_flops
from perf.glance_focus import cumulative_gflops, encoder_gflops, step_gflops
from tools.make_texture_world import make_texture_world, render_image
from utils import UserError

# End-to-end settings and margins (chance 1/3); texture_run's docstring has the figures of three seeds.
E2E_SEED, E2E_SIZE, E2E_EPOCHS, E2E_LR = 0, 192, "3", "4e-3"
E2E_PLAIN_MAX, E2E_GF_MIN = 0.55, 0.65


@pytest.fixture(scope="module")
def gf():
    torch.manual_seed(0)
    return create_glance_focus("lsnet_t_gf", num_classes=3, glance_size=64, patch_size=32, focus_steps=3).eval()


def test_policy_shapes_log_probs_and_entropy():
    torch.manual_seed(0)
    policy = PatchPolicy(in_chs=8, hidden_dim=4, grid=2, std=0.2)
    state = policy.state(torch.randn(5, 6, 3, 3), torch.randn(5, 4))  # 6 channels are zero-padded to 8
    assert state.shape == (5, 8 * 4 + 4)
    dist, value = policy(state)
    assert dist.mean.shape == (5, 2) and value.shape == (5,)
    assert ((dist.mean > 0) & (dist.mean < 1)).all()
    action = torch.tensor([[0.3, 0.9]] * 5)
    manual = (-((action - dist.mean) ** 2) / (2 * 0.2**2) - math.log(0.2 * math.sqrt(2 * math.pi))).sum(1)
    assert torch.allclose(dist.log_prob(action).sum(1), manual, atol=1e-5)
    assert torch.allclose(dist.entropy().sum(1), torch.full((5,), 2 * (0.5 + 0.5 * math.log(2 * math.pi * 0.04))))


def test_crop_patches_inside_clamped_and_padded():
    images = torch.arange(40 * 60, dtype=torch.float32).reshape(1, 1, 40, 60).repeat(3, 1, 1, 1)
    centres = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    patches, boxes = crop_patches(images, centres, 16)
    assert boxes.tolist() == [[0, 0, 16, 16], [44, 24, 60, 40], [22, 12, 38, 28]]
    for patch, (x0, y0, x1, y1) in zip(patches, boxes.tolist(), strict=True):
        assert torch.equal(patch[0], images[0, 0, y0:y1, x0:x1])
    small = torch.ones(1, 3, 10, 50)  # shorter than the crop: read whole, zero-padded
    patch, box = crop_patches(small, torch.tensor([[0.9, 0.5]]), 16)
    assert box.tolist() == [[34, 0, 50, 10]]
    assert patch[0, :, :10].eq(1).all() and patch[0, :, 10:].eq(0).all()


def test_views_of_non_square_exif_rotated_image_map_back(tmp_path):
    image = load_image(gen.exif_rotated_jpeg(tmp_path / "r.jpg"))  # upright 20x40: red on top, blue below
    view = make_view(image, glance_size=8, focus_resolution=40)
    assert view.focus.size == (40, 80) and view.glance.size == (8, 8) and view.scale == 2.0
    crop, box = read_crop(torch.from_numpy(np.array(view.focus)).permute(2, 0, 1).float(), (0.5, 0.0), 32)
    assert box == [4, 0, 36, 32]
    assert crop[0].mean() > 200 and crop[2].mean() < 60  # the red top half
    assert to_original(torch.tensor([box]), view) == [[2, 0, 18, 16]]
    window = make_view(image, glance_size=8, focus_resolution=40, window="center")
    assert window.focus.size == (40, 40) and window.offset == (0, 20)
    assert to_original(torch.tensor([[0, 0, 40, 40]]), window) == [[0, 10, 20, 30]]
    native = make_view(Image.new("RGB", (30, 50)), glance_size=8, focus_resolution=0)
    assert native.focus.size == (30, 50) and native.scale == 1.0


def test_evaluation_views_of_the_train_split_are_centred_and_unflipped(tmp_path):
    """eval_loader's views of any split (train included) are the centred window, the same on every read; the train
    split's training views are random windows."""
    gen.noise_image(tmp_path / "train" / "a" / "wide.png", (96, 32), seed=0)
    evaluation = build_gf_dataset(tmp_path, "train", ["a"], 16, 32, train=False)
    torch.manual_seed(0)
    reads = [evaluation[0][0] for _ in range(4)]
    assert all(torch.equal(r[1], reads[0][1]) for r in reads)
    centre = to_tensor(make_view(load_image(tmp_path / "train" / "a" / "wide.png"), 16, 32, "center").focus)
    assert torch.equal(reads[0][1], centre)
    training = build_gf_dataset(tmp_path, "train", ["a"], 16, 32)
    assert len({training[0][0][1].sum().item() for _ in range(8)}) > 1


def test_gru_gives_anytime_logits_and_styles(gf):
    torch.manual_seed(1)
    glance, focus = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        out = gf(glance, focus, policy="learned")
        again = gf(glance, focus, policy="learned")
        short = gf(glance, focus, steps=1, centres=out.centres)
        sampled = gf(glance, focus, policy="sample")
        fallback = gf(glance, focus, policy="fallback")
    assert out.logits.shape == (4, 2, 3) and out.styles.shape == (4, 2, 256)
    assert out.centres.shape == (3, 2, 2) and out.boxes.shape == (3, 2, 4)
    assert out.log_probs.shape == out.values.shape == out.entropies.shape == (3, 2)
    assert torch.equal(out.logits, again.logits)  # the policy's mean at inference: deterministic
    assert torch.allclose(short.logits, out.logits[:2], atol=1e-5)  # step t depends only on steps 0..t
    assert not torch.allclose(out.logits[1], out.logits[0])
    assert not torch.equal(sampled.centres, out.centres)
    assert fallback.log_probs is None and fallback.boxes.shape == (3, 2, 4)
    assert ((out.boxes[..., 2] - out.boxes[..., 0]) == 32).all() and (out.boxes[..., 3] <= 96).all()


def test_fallback_visits_the_most_activated_cells_first():
    fmap = torch.zeros(1, 4, 4, 4)
    fmap[0, :, 1, 3] = 5.0
    fmap[0, :, 2, 0] = 3.0
    centres = most_activated_centres(fmap, steps=2)
    assert centres.shape == (2, 1, 2)
    assert torch.allclose(centres[:, 0], torch.tensor([[3.5 / 4, 1.5 / 4], [0.5 / 4, 2.5 / 4]]))


def _probs(top: list[list[float]], labels_right: list[list[bool]]) -> torch.Tensor:
    """(T+1, N, 2) probabilities with the given top probability; class 0 when right, else class 1."""
    p = torch.tensor(top)
    right = torch.tensor(labels_right)
    return torch.stack([torch.where(right, p, 1 - p), torch.where(right, 1 - p, p)], dim=-1)


def test_early_exit_bookkeeping():
    probs = _probs([[0.9, 0.6, 0.55, 0.7], [0.95, 0.8, 0.6, 0.9], [0.99, 0.95, 0.7, 0.6]],
                   [[True, False, False, True], [True, True, False, False], [True, True, True, False]])
    labels = torch.zeros(4, dtype=torch.long)
    assert exit_steps(probs, threshold_thresholds(2, 0.8)).tolist() == [0, 1, 2, 1]
    summary = exit_summary(probs, labels, threshold_thresholds(2, 0.8), cumulative_gflops([1.0, 0.5, 0.5]))
    assert summary["accuracy"] == pytest.approx(0.75) and summary["avg_gflops"] == pytest.approx(1.5)
    assert summary["avg_steps"] == pytest.approx(1.0)
    thresholds = calibrate_thresholds(probs, np.array([0.5, 0.25, 0.25]))  # 2 exit at the glance, 1, then 1
    assert exit_steps(probs, thresholds).bincount(minlength=3).tolist() == [2, 1, 1]
    table = budget_curve(probs, labels, cumulative_gflops([1.0, 0.5, 0.5]))
    assert table[0]["avg_gflops"] == pytest.approx(1.0) and table[-1]["avg_gflops"] == pytest.approx(2.0)
    assert all(row["avg_gflops"] <= 1.5 for row in [thresholds_for_budget(table, 1.5)])
    assert thresholds_for_budget(table, 2.0)["accuracy"] >= thresholds_for_budget(table, 1.0)["accuracy"]
    with pytest.raises(UserError, match="below the cheapest"):
        thresholds_for_budget(table, 0.5)


def test_flops_per_step_count_ska_with_flops_py_handle(gf):
    per_step = step_gflops(gf)
    assert len(per_step) == 4 and per_step[1] == per_step[2] == per_step[3]
    with torch.no_grad():
        analysis = count_flops(gf.local_encoder.eval(), (torch.zeros(1, 3, 32, 32),))
    ska = sum(flops for op, flops in analysis.by_operator().items() if "SKA" in op)
    assert ska > 0  # the SKA operator is counted by flops.py's handle
    head = per_step[1] - analysis.total() / 1e9  # projection, GRU cell, classifier and policy MLPs
    assert 0 < head < 0.002
    assert per_step[0] > per_step[1]  # a 64 px glance costs more than a 32 px crop


def test_texture_world_texture_is_fine_and_independent_of_composition():
    a = np.asarray(render_image(np.random.default_rng(3), "horizontal", 96, 96), dtype=np.float32)
    b = np.asarray(render_image(np.random.default_rng(3), "vertical", 96, 96), dtype=np.float32)
    small_a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((16, 16), Image.BICUBIC), dtype=np.float32)
    small_b = np.asarray(Image.fromarray(b.astype(np.uint8)).resize((16, 16), Image.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() > 4  # the textures differ at full resolution...
    assert np.abs(small_a - small_b).mean() < 2.5  # ...and vanish when shrunk 6x
    row_energy = np.abs(np.diff(a.mean(2), axis=0)).mean() - np.abs(np.diff(a.mean(2), axis=1)).mean()
    assert row_energy > 2  # horizontal lines: neighbouring rows differ more than neighbouring columns


def test_init_from_an_artist_model_folder_loads_both_encoders(tmp_path, gf):
    artist = timm.create_model("lsnet_t_artist", num_classes=5, feature_dim=128)
    save_checkpoint_atomic({"model": artist.state_dict()}, tmp_path / "model_best.pth")
    assert init_encoders(gf, tmp_path, log=lambda _: None) == "lsnet_t_artist"
    expected = artist.state_dict()
    for encoder in (gf.global_encoder, gf.local_encoder):
        assert all(torch.equal(value, expected[key]) for key, value in encoder.state_dict().items())
    torch.save({"model": {"head.l.weight": torch.zeros(2, 4)}}, tmp_path / "model_best.pth")
    with pytest.raises(UserError, match="unrecognised weights"):
        init_encoders(gf, tmp_path)


def _train_plain_at_glance_size(data_path, classes, epochs: int, batch_size: int, lr: float) -> float:
    """A plain lsnet_t trained and evaluated on the glances (whole images at the glance size): val accuracy."""
    torch.manual_seed(E2E_SEED)
    net = timm.create_model("lsnet_t", num_classes=len(classes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    train = DataLoader(build_gf_dataset(data_path, "train", classes, 32, E2E_SIZE), batch_size=batch_size,
                       shuffle=True, drop_last=True)
    for _ in range(epochs):
        net.train()
        for (glance, _), labels in train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(glance), labels).backward()
            optimizer.step()
    val = DataLoader(build_gf_dataset(data_path, "val", classes, 32, E2E_SIZE), batch_size=48)
    net.eval()
    with torch.no_grad():
        hits = [(net(glance).argmax(1) == labels).float() for (glance, _), labels in val]
    return torch.cat(hits).mean().item()


@pytest.fixture(scope="module")
def texture_run(tmp_path_factory) -> dict:
    """A texture world (192 px, 2-px textures, 3 artists); glance and focus trained on it (32 px glance, two 32 px
    crops at native resolution), calibrated and evaluated; a plain lsnet_t trained as long on the 32 px glances.

    Seeds 0, 1, 2 gave val top-1: plain at 32 px 0.40, 0.31, 0.46; glance 0.29, 0.33, 0.33; glance + 2 crops 0.90,
    0.92, 0.79; 0.040 GFLOPs against 0.213 for a plain lsnet_t at 192 px. About 50-80 s on a shared 2-core CPU.
    """
    root = tmp_path_factory.mktemp("texture")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU one thread is several times faster than contending threads
    try:
        classes = make_texture_world(root / "world", artists=3, train=48, val=16, size=(E2E_SIZE, E2E_SIZE),
                                     amplitude=40, seed=E2E_SEED, everywhere=True)
        flags = ["--data-path", str(root / "world"), "--output-dir", str(root / "gf"), "--glance-size", "32",
                 "--patch-size", "32", "--focus-resolution", str(E2E_SIZE), "--focus-steps", "2", "--lr", E2E_LR,
                 "--workers", "0", "--device", "cpu", "--seed", str(E2E_SEED)]
        parser = train_glance_focus.get_args_parser()
        train_glance_focus.main(parser.parse_args([*flags, "--batch-size", "16", "--epochs", E2E_EPOCHS, "1", "1"]))
        result = train_glance_focus.main(parser.parse_args([*flags, "--batch-size", "48", "--calibrate-budget",
                                                            "--eval"]))["eval"]
        plain_low = _train_plain_at_glance_size(root / "world", classes, int(E2E_EPOCHS), 16, float(E2E_LR))
        plain_full_gflops = encoder_gflops(timm.create_model("lsnet_t", num_classes=0).eval(), E2E_SIZE)
    finally:
        torch.set_num_threads(threads)
    print(f"\nanytime {result['anytime_learned']} fallback {result['anytime_fallback']} plain@32 {plain_low:.3f} "
          f"GF GFLOPs {result['step_gflops']} plain@{E2E_SIZE} {plain_full_gflops:.4f}")
    return {"world": root / "world", "folder": root / "gf", "result": result, "plain_low": plain_low,
            "plain_full_gflops": plain_full_gflops}


@pytest.mark.slow
def test_glance_and_focus_reads_texture_a_low_resolution_plain_model_misses(texture_run):
    """The glance alone and a plain model at 32 px stay near chance (1/3); glance and focus reads the texture, at a
    fraction of the compute of a plain model at 192 px; the budget curve runs from the glance to all steps."""
    result = texture_run["result"]
    cumulative = cumulative_gflops(result["step_gflops"])
    assert texture_run["plain_low"] <= E2E_PLAIN_MAX and result["anytime_learned"][0] <= E2E_PLAIN_MAX
    assert result["anytime_learned"][-1] >= E2E_GF_MIN
    assert cumulative[-1] < 0.3 * texture_run["plain_full_gflops"]
    curve = result["curve"]  # budget thresholds calibrated on train/, applied to val/
    assert cumulative[0] <= curve[0]["avg_gflops"] <= curve[-1]["avg_gflops"] <= cumulative[-1]
    assert all(a["avg_gflops"] <= b["avg_gflops"] for a, b in zip(curve, curve[1:], strict=False))


@pytest.mark.slow
def test_trained_folder_predicts_with_boxes_early_exit_and_drawn_crops(texture_run, tmp_path):
    gf = load_glance_focus(texture_run["folder"], "cpu")
    cumulative = cumulative_gflops(texture_run["result"]["step_gflops"])
    image = next((texture_run["world"] / "val").glob("*/0000.png"))
    full = gf.predict(image)
    assert full.steps == 2 and len(full.boxes) == 2 and full.gflops == pytest.approx(cumulative[-1])
    assert all(0 <= x0 < x1 <= E2E_SIZE and 0 <= y0 < y1 <= E2E_SIZE and x1 - x0 == 32
               for x0, y0, x1, y1 in full.boxes)
    early = gf.predict(image, exit_threshold=0.01)
    assert early.steps == 0 and early.boxes == [] and early.gflops == pytest.approx(cumulative[0])
    assert gf.save_crops(image, full, tmp_path / "crops" / "a").is_file()


def test_stages_save_after_each_epoch_and_resume(tmp_path, gf):
    torch.manual_seed(0)
    samples = [((torch.randn(3, 64, 64), torch.randn(3, 64, 64)), label) for label in (0, 1)]
    loader = DataLoader(samples, batch_size=2, sampler=DistributedSampler(samples, num_replicas=1, rank=0))
    logs = []
    cfg = StageConfig(epochs=1, lr=1e-3)
    first = run_stage(gf, 1, loader, cfg, tmp_path, log=logs.append)
    assert first["done"] and first["epoch"] == 1 and (tmp_path / "stage1.pth").is_file()
    assert first["process_digests"] == [parameter_digest(gf)]
    cfg.epochs = 2
    second = run_stage(gf, 1, loader, cfg, tmp_path, log=logs.append)
    assert second["epoch"] == 2 and len(second["history"]) == 2
    assert any("resuming after epoch 1" in line for line in logs)
    policy_before = [p.clone() for p in gf.policy.parameters()]
    encoder_before = [p.clone() for p in gf.global_encoder.parameters()]
    reward = run_stage(gf, 2, loader, StageConfig(epochs=1, lr=1e-2), tmp_path, log=logs.append)
    assert reward["done"]
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, gf.policy.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, gf.global_encoder.parameters(), strict=True))
    assert all(p.requires_grad for p in gf.parameters())  # the frozen parts get their gradients back
    records = [json.loads(line) for line in (tmp_path / "train_log.txt").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (1, 2), (2, 1)]  # one record per stage epoch
    assert 0 <= records[0]["train_acc1"] <= 1 and records[2]["reward"] == pytest.approx(reward["history"][0])
    assert records[1]["lr"] == pytest.approx(0)  # the cosine schedule, stepped per optimizer step, ends at 0
    for stage in (1, 2):  # loss / accuracy (stage 2: reward) / learning-rate curves of each stage
        assert (tmp_path / f"stage{stage}" / "report.html").read_text().count("<img") == 3
    gf.eval()


def test_native_focus_resolution_trains_and_calibrates_on_images_of_different_sizes(tmp_path):
    """--focus-resolution 0 reads every image at its own size: batches of different window sides are collated
    (they stopped the first batch with 'stack expects each tensor to be equal size')."""
    for split, count in (("train", 4), ("val", 2)):
        for a, artist in enumerate(("ann", "bob")):
            for i in range(count):
                size = (64 + 12 * i, 96 - 8 * i)
                gen.noise_image(tmp_path / "data" / split / artist / f"{i}.png", size, seed=a * 9 + i)
    flags = ["--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "gf"), "--glance-size", "32",
             "--patch-size", "32", "--focus-resolution", "0", "--focus-steps", "1", "--batch-size", "4", "--epochs",
             "1", "--workers", "0", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_glance_focus.main(train_glance_focus.get_args_parser().parse_args(flags))
        train_glance_focus.main(train_glance_focus.get_args_parser().parse_args(
            [*flags, "--calibrate-budget", "--calibrate-on", "val"]))
    finally:
        torch.set_num_threads(threads)
    gf = load_glance_focus(tmp_path / "gf", "cpu")
    assert gf.predict(tmp_path / "data" / "val" / "bob" / "1.png").steps == 1
    assert gf.gf["budget_calibrated_on"] == "val" and len(gf.gf["budget_table"]) >= 1
    with pytest.raises(UserError, match="holds no images"):
        train_glance_focus.main(train_glance_focus.get_args_parser().parse_args(
            [*flags, "--calibrate-budget", "--calibrate-on", "calib"]))


def test_inference_script_and_api_read_a_glance_focus_folder(tmp_path, gf):
    """inference_artist.py and load_model_bundle take a glance-and-focus folder: the usual outputs plus, per image,
    the steps used, the crop boxes in original pixels and the GFLOPs; the exit threshold stops early."""
    from artifacts.glance_focus_folder import save_model_folder
    from inference_artist import get_args_parser, main
    from predictor import FocusOptions, load_model_bundle

    save_model_folder(gf, "lsnet_t_gf", tmp_path / "gf", ["a", "b", "c"])
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate(((96, 80), (64, 128))):
        gen.noise_image(images / f"{i}.png", size=size, seed=i)
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    main(get_args_parser().parse_args(["--checkpoint", str(tmp_path / "gf"), "--input", str(images), "--output",
                                       str(out), "--mode", "both", "--save-crops", str(tmp_path / "crops")]))
    results = json.loads((out / "batch_results.json").read_text())
    assert results["model"] == "lsnet_t_gf" and [s["path"] for s in results["skipped"]] == ["broken.png"]
    entry = results["results"]["1.png"]
    assert len(entry["classification"]) == 3 and len(entry["features"]) == gf.classifier.hidden_dim
    focus = entry["glance_focus"]
    assert focus["steps"] == 3 and focus["glance_box"] == [0, 0, 64, 128] and len(focus["boxes"]) == 3
    assert all(0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 128 for x0, y0, x1, y1 in focus["boxes"])
    assert np.load(out / "features.npy").shape == (2, gf.classifier.hidden_dim)
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == ["0.png", "1.png"]

    early = load_model_bundle(tmp_path / "gf", focus=FocusOptions(exit_threshold=1e-3))
    prediction = early.predict(images / "0.png", "both")
    assert prediction["glance_focus"]["steps"] == 0 and prediction["glance_focus"]["boxes"] == []
    assert abs(float(np.linalg.norm(prediction["features"])) - 1.0) < 1e-5
    assert [c["class_name"] for c in early.classify(images / "0.png", top_k=2)] != []
    with pytest.raises(UserError, match="not a glance-and-focus model"):
        load_model_bundle(tmp_path / "gf" / "model_best.pth", focus=FocusOptions(budget=0.1))
