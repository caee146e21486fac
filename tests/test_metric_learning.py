"""Metric-learning losses (ArcFace, sub-centre ArcFace, supervised contrastive), the class-balanced sampler, and
training with them: accumulation, EMA, resume, --eval and torchrun on a tiny generated dataset."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from artifacts.checkpoint import load_checkpoint_file
from data.samplers import ClassBalancedSampler
from losses import ArcFaceLoss, SupConLoss
from tests import supcon_worker
from tests.test_train import (
    NO_AUG,
    assert_same_tensors,
    make_dataset,
    read_log,
    run_main,
    run_script,
    train_straight_and_resumed,
)
from utils import UserError


def test_arcface_margin_and_subcentres():
    torch.manual_seed(0)
    loss = ArcFaceLoss(num_classes=3, dim=8, scale=10.0, margin=0.3, subcenters=2)
    proxies = F.normalize(loss.proxies.detach(), dim=1).view(3, 2, 8)
    targets = torch.tensor([0, 1, 2])
    # Each vector is the second sub-centre of its class: that sub-centre's cosine (1) is the class's cosine.
    at_proxies = proxies[:, 1] * 5.0
    assert torch.allclose(loss.cosines(at_proxies).diagonal(), torch.ones(3), atol=1e-5)
    wrong = loss(at_proxies, targets.roll(1))
    right = loss(at_proxies, targets)
    assert right < wrong
    no_margin = ArcFaceLoss(3, 8, scale=10.0, margin=0.0, subcenters=2)
    no_margin.proxies.data.copy_(loss.proxies.data)
    assert no_margin(at_proxies, targets) < right  # the margin makes the target harder
    features = at_proxies.clone().requires_grad_(True)
    loss(features, targets).backward()
    assert features.grad.abs().sum() > 0 and loss.proxies.grad.abs().sum() > 0


def test_supcon_prefers_vectors_clustered_by_class():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    targets = torch.arange(4).repeat_interleave(4)
    clustered = centres[targets] + 0.05 * torch.randn(16, 16)
    supcon = SupConLoss(temperature=0.1)
    assert supcon(clustered, targets) < 0.5 * supcon(clustered, targets[torch.randperm(16)])
    lonely = torch.randn(3, 16, requires_grad=True)
    assert supcon(lonely, torch.arange(3)).item() == 0.0  # no positive pair: no signal, still differentiable


def shards(labels, k, world_size, epoch=0, seed=0):
    samplers = [ClassBalancedSampler(labels, k, num_replicas=world_size, rank=rank, seed=seed)
                for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def test_class_balanced_sampler_balances_a_long_tail_over_simulated_processes():
    labels = [0] * 40 + [1] * 12 + [2] * 3 + [3]  # long-tailed: 40, 12, 3 and 1 images
    k, world_size = 4, 2
    per_rank = shards(labels, k, world_size)
    assert len(per_rank[0]) == len(per_rank[1]) == len(ClassBalancedSampler(labels, k, 2, 0))
    total = sum(len(indices) for indices in per_rank)
    assert len(labels) <= total < len(labels) + 2 * k * world_size
    for indices in per_rank:  # whole groups: K images of one artist in a row
        for start in range(0, len(indices), k):
            assert len({labels[i] for i in indices[start:start + k]}) == 1
    counts = Counter(labels[i] for indices in per_rank for i in indices)
    assert max(counts.values()) - min(counts.values()) <= k  # every artist equally often (up to padding)
    assert set(per_rank[0]) | set(per_rank[1]) >= set(range(40, 56))  # the rare artists' every image
    group_starts = [{tuple(ix[s:s + k]) for s in range(0, len(ix), k)} for ix in per_rank]
    assert per_rank[0] != per_rank[1] and len(group_starts[0] & group_starts[1]) <= 1  # distinct shards
    assert shards(labels, k, world_size) == per_rank  # seeded: every process can compute its shard
    assert shards(labels, k, world_size, epoch=1) != per_rank
    assert shards(labels, k, world_size, seed=1) != per_rank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("metric_data"), train_per_class=6, val_per_class=3)


METRIC = ["--batch-size", "8", "--lr", "0.5", "--model-ema-decay", "0.9", *NO_AUG]


@pytest.mark.slow
def test_subcenter_arcface_resumes_exactly_and_evaluates(data, tmp_path):
    """Class-balanced batches, accumulation and EMA: 2 epochs straight == 1 epoch + --resume (proxies included)."""
    common = ["--data-path", str(data), "--loss", "subcenter-arcface", "--subcenters", "2", "--sampler",
              "class-balanced", "--samples-per-class", "2", "--accumulation-steps", "2", *METRIC]
    _, straight, resumed = train_straight_and_resumed(run_main, common, tmp_path)
    assert straight["criterion"]["metric.proxies"].shape == (4 * 2, 32)
    for key in ("model", "model_ema", "optimizer", "criterion"):
        assert_same_tensors(straight[key], resumed[key], key)
    log = read_log(tmp_path / "straight")
    assert [r["epoch"] for r in log] == [1, 2] and "val_acc1" in log[-1]
    results = run_main("--data-path", str(data), "--eval", "--resume", str(tmp_path / "straight" / "checkpoint.pth"),
                       "--loss", "subcenter-arcface", *METRIC)
    assert results["model"]["acc1"] == pytest.approx(log[-1]["val_acc1"])


@pytest.mark.slow
def test_arcface_under_torchrun_with_class_balanced_shards_and_supcon(data, tmp_path):
    output_dir = tmp_path / "ddp"
    result = run_script("--data-path", str(data), "--output-dir", str(output_dir), "--loss", "arcface", "--sampler",
                        "class-balanced", "--samples-per-class", "2", "--batch-size", "4", "--epochs", "1", *NO_AUG,
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = load_checkpoint_file(output_dir / "checkpoint.pth")
    assert checkpoint["args"]["world_size"] == 2 and "criterion" in checkpoint
    run_main("--data-path", str(data), "--output-dir", str(tmp_path / "supcon"), "--loss", "supcon", "--sampler",
             "class-balanced", "--samples-per-class", "4", "--epochs", "1", *METRIC)
    assert "criterion" not in load_checkpoint_file(tmp_path / "supcon" / "checkpoint.pth")  # no parameters


@pytest.mark.parametrize("argv, message", [
    (["--loss", "arcface", "--mixup", "0.8"], r"--loss arcface needs each image's own artist: drop --mixup"),
    (["--loss", "supcon", "--temperature", "0"], r"--temperature must be above 0, got 0"),
    (["--loss", "arcface", "--distillation-type", "soft"], r"drop --distillation-type"),
    (["--sampler", "class-balanced", "--samples-per-class", "0"], r"--samples-per-class must be at least 1"),
])
def test_bad_loss_flags_are_one_line_errors(data, tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        run_main("--data-path", str(data), "--output-dir", str(tmp_path), "--epochs", "1", *argv)


@pytest.mark.slow
def test_supcon_under_ddp_contrasts_all_processes_batches(tmp_path):
    """Two gloo processes with 5 and 3 of 8 vectors: DDP's mean of their losses and gradients equals one process
    on all 8 (every positive pair crosses or stays inside a process's share)."""
    torch.multiprocessing.spawn(supcon_worker.run_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    features, targets = supcon_worker.batch()
    whole = features.clone().requires_grad_(True)
    expected = SupConLoss(temperature=0.2)(whole, targets)
    expected.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected.detach(), atol=1e-5)
    # DDP averages the model's gradients over the 2 processes; the gather sends every rank's share back.
    assert torch.allclose(torch.cat([ranks[0]["grad"], ranks[1]["grad"]]) / 2, whole.grad, atol=1e-5)
    alone = SupConLoss(temperature=0.2)(features[:5], targets[:5])  # without the gather: its own share only
    assert not torch.allclose(ranks[0]["loss"], alone)
