"""Unit tests of the training loop pieces: accumulation, non-finite loss, metrics, losses, RNG state, atomic saves."""

import copy
import random
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import utils
from artifacts.checkpoint import load_checkpoint_file, save_checkpoint_atomic
from artifacts.run_folder import tensorboard_tag
from gfnet.stages import GUARD_ADVICE
from losses import DistillationLoss, build_classification_criterion
from training.loops import evaluate, train_one_epoch
from training.metrics import TopKAccuracy
from utils import UserError


def small_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def tensor_data(n: int = 16, num_classes: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=generator),
                         torch.randint(0, num_classes, (n,), generator=generator))


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def run_epoch(batch_size: int, accumulation_steps: int, n: int = 16) -> tuple[nn.Module, int]:
    net = small_net()
    optimizer = CountingSGD(net.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(tensor_data(n), batch_size=batch_size, shuffle=False)
    train_one_epoch(net.eval(), nn.CrossEntropyLoss(), loader, optimizer, torch.device("cpu"), 0,
                           accumulation_steps=accumulation_steps, set_training_mode=False)
    return net, optimizer.steps


@pytest.mark.parametrize("n", [16, 12])
def test_accumulation_matches_one_large_batch(n):
    """B x 2 accumulation steps == one batch of 2B (BatchNorm in eval mode, no augmentation); with 12 samples the
    last group holds one micro-batch and is averaged over its own size, like a last batch of 4."""
    accumulated, steps = run_epoch(batch_size=4, accumulation_steps=2, n=n)
    large, large_steps = run_epoch(batch_size=8, accumulation_steps=1, n=n)
    assert steps == large_steps == 2
    for (name, a), b in zip(accumulated.state_dict().items(), large.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_loss_names_epoch_and_step():
    class NanAtSecondStep(nn.Module):
        calls = 0

        def forward(self, output, target):
            self.calls += 1
            loss = nn.functional.cross_entropy(output, target)
            return loss * float("nan") if self.calls == 2 else loss

    net = small_net()
    before = copy.deepcopy(net.state_dict())
    loader = DataLoader(tensor_data(), batch_size=4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"loss is nan at epoch 3, step 2/4.*; lower --lr, raise --warmup-epochs"):
        train_one_epoch(net, NanAtSecondStep(), loader, optimizer, torch.device("cpu"), 2,
                               accumulation_steps=2)
    # The first micro-batch's gradient was never applied: the step comes after the second.
    for name, value in net.state_dict().items():
        if value.is_floating_point() and "running" not in name:
            assert torch.equal(value, before[name]), name
    with pytest.raises(UserError, match=r"loss is nan at epoch 1, step 2/4.*; " + re.escape(GUARD_ADVICE) + "$"):
        train_one_epoch(net, NanAtSecondStep(), loader, optimizer, torch.device("cpu"), 0,
                        advice=GUARD_ADVICE)  # glance-and-focus has no --warmup-epochs or --clip-grad


def test_topk_accuracy_and_evaluate():
    metric = TopKAccuracy((1, 5))
    output = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    metric.update(output, torch.tensor([0, 2, 2]))
    # k capped at 3 classes; recall: class 0 1/1, class 2 0/2, class 1 has no image (left out of the mean)
    assert metric.compute() == pytest.approx({"acc1": 100 / 3, "acc5": 100.0, "macro_recall": 50.0})

    net = small_net()
    loader = DataLoader(tensor_data(), batch_size=5)
    stats = evaluate(net, loader, torch.device("cpu"))
    outputs = net.eval()(loader.dataset.tensors[0])
    targets = loader.dataset.tensors[1]
    assert stats["loss"] == pytest.approx(nn.functional.cross_entropy(outputs, targets).item(), rel=1e-5)
    assert stats["acc1"] == pytest.approx(100 * (outputs.argmax(1) == targets).float().mean().item())


def test_distillation_loss_modes():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    inputs, labels = torch.randn(6, 4), torch.randint(0, 3, (6,))
    out, out_dist = torch.randn(6, 3), torch.randn(6, 3)
    base = nn.CrossEntropyLoss()
    assert torch.equal(DistillationLoss(base, None)(inputs, out, labels), base(out, labels))
    hard = DistillationLoss(base, teacher, "hard", alpha=0.25)(inputs, (out, out_dist), labels)
    expected = 0.75 * base(out, labels) + 0.25 * base(out_dist, teacher(inputs).argmax(1))
    torch.testing.assert_close(hard, expected)
    soft = DistillationLoss(base, teacher, "soft", alpha=1.0, tau=2.0)(inputs, (out, out_dist), labels)
    kl = nn.functional.kl_div(nn.functional.log_softmax(out_dist / 2, 1), nn.functional.softmax(teacher(inputs) / 2, 1),
                              reduction="sum") * 4 / out_dist.numel()
    torch.testing.assert_close(soft, kl)
    criterion = DistillationLoss(base, teacher.train(), "soft").train()
    assert not criterion.teacher.training
    with pytest.raises(ValueError, match="distillation=True"):
        criterion(inputs, out, labels)
    assert type(build_classification_criterion(True, 0.1)).__name__ == "SoftTargetCrossEntropy"
    assert type(build_classification_criterion(False, 0.1)).__name__ == "LabelSmoothingCrossEntropy"


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    utils.seed_everything(3)
    random.gauss(0, 1)  # python keeps a cached gaussian in its state
    np.random.normal()
    path = tmp_path / "rng.pth"
    save_checkpoint_atomic({"model": {"w": torch.zeros(1)}, "rng": utils.get_rng_state()}, path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal(), torch.rand(1))
    utils.set_rng_state(load_checkpoint_file(path)["rng"])  # weights_only load
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal(), torch.rand(1)) == expected


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint_atomic({"model": {"w": torch.ones(3)}, "epoch": 4}, path)
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic({"model": {"w": torch.zeros(3)}, "epoch": 5}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint_file(path)["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_tensorboard_tags():
    assert [tensorboard_tag(k) for k in ("train_loss", "lr", "val_acc1", "ema_val_map_macro")] == [
        "train/loss", "train/lr", "val/acc1", "ema_val/map_macro"]
