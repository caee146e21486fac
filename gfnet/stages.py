"""The three GFNet training stages on the main training engine (CPU or GPU, AMP, gradient accumulation,
DistributedDataParallel under torchrun).

1. Encoders and recurrent classifier, with uniformly random crop centres; the loss is the cross-entropy of every
   step's logits (anytime). 2. The patch policy with PPO (:mod:`gfnet.ppo`), everything else frozen. 3. The recurrent
   classifier fine-tuned with the learned policy (its mean centres), encoders frozen.

Stages 1 and 3 run :func:`training.loops.train_one_epoch` (AMP, accumulation without the all-reduce of non-final
micro-batches, the non-finite loss check); every stage has the main engine's cosine schedule stepped per optimizer
step (:func:`training.factory.build_scheduler`), DDP wrapping (:func:`training.trainer.wrap_model`; frozen parts are
not synchronised), optimizer / scaler resume (:class:`training.resume.TrainingState`), the divergence guard and the
non-finite weights check, a ``train_log.txt`` record per epoch (with its ``stage``) and ``stage<N>/report.html``.
Each stage keeps its state in ``stage<N>.pth`` of the run folder after every epoch and resumes from it. The main
process writes the files; every process's parameter digest is stored to show they agree.
"""

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import utils
from artifacts.checkpoint import load_checkpoint_file, save_checkpoint_atomic
from artifacts.run_folder import SCHEDULE_ARGS, ResumePoint, append_log_record, read_log_records
from gfnet.config import StageConfig
from gfnet.ppo import policy_epoch
from model.glance_focus import GlanceFocus
from training.distributed import DistEnv
from training.factory import build_scheduler
from training.guard import DivergenceGuard
from training.loops import train_one_epoch
from training.report import write_report
from training.resume import TrainingState, epoch_seed
from training.settings import section_values
from training.trainer import amp_dtype, check_finite_weights, grad_scaler, wrap_model
from utils import UserError

__all__ = ["AnytimeLoss", "StageNet", "anytime_loss", "parameter_digest", "run_stage", "stage_params"]

# torch < 2.4 has no fused AdamW on the CPU (requirements.txt allows torch 2.1); it is about 3x faster where it exists
FUSED_ADAMW_ON_CPU = torch.__version__ >= (2, 4)
GUARD_ADVICE = "lower --lr (stage 2: --policy-lr) or train without --amp"
STAGE_MODULES = {1: ("global_encoder", "local_encoder", "classifier"), 2: ("policy",), 3: ("classifier",)}


def anytime_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the (T+1, N, K) logits of every step."""
    steps = logits.shape[0]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(steps))


class AnytimeLoss(nn.Module):
    """:func:`anytime_loss` as a criterion; it also counts the last step's correct answers (``train_acc1``)."""

    def __init__(self):
        super().__init__()
        self.correct = self.seen = 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.correct += (logits[-1].detach().argmax(-1) == labels).sum().item()
        self.seen += len(labels)
        return anytime_loss(logits, labels)

    def accuracy(self, device: torch.device) -> float:
        """Top-1 after the last step over the epoch's training views of every process; resets the counts."""
        sums = utils.all_reduce_sum(torch.tensor([self.correct, self.seen], dtype=torch.float64, device=device))
        self.correct = self.seen = 0
        return (sums[0] / sums[1].clamp(min=1)).item()


def stage_params(model: GlanceFocus, stage: int) -> list[nn.Parameter]:
    """Trainable parameters of a stage: 1 encoders + classifier, 2 the policy, 3 the classifier."""
    return [p for name in STAGE_MODULES[stage] for p in getattr(model, name).parameters()]


def _enter_stage(model: GlanceFocus, stage: int) -> None:
    """Train mode and gradients for the stage's modules only (frozen encoders keep their BatchNorm statistics and
    compute no gradients); :func:`run_stage` gives every parameter its gradient back when the stage ends."""
    model.eval().requires_grad_(False)
    for name in STAGE_MODULES[stage]:
        getattr(model, name).train().requires_grad_(True)


class StageNet(nn.Module):
    """A classifier stage as the main loop sees it: views in, (T+1, N, K) anytime logits out; ``train()`` puts only
    the stage's modules in training mode."""

    def __init__(self, model: GlanceFocus, stage: int):
        super().__init__()
        self.model, self.stage = model, stage
        self.policy = "random" if stage == 1 else "learned"

    def train(self, mode: bool = True) -> "StageNet":
        super().train(mode)
        if mode:
            _enter_stage(self.model, self.stage)
        return self

    def forward(self, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        glance, focus = views
        return self.model(glance, focus, policy=self.policy).logits


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters, bit for bit."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _agreement(model: GlanceFocus, stage: int, epoch: int, log: Callable[[str], None]) -> list[str]:
    """Every process's :func:`parameter_digest` (the stage checkpoint keeps them); a warning when they differ."""
    digests = utils.all_gather_objects(parameter_digest(model))
    if len(set(digests)) > 1:
        log(f"warning: the weights of the {len(digests)} processes differ after stage {stage} epoch {epoch + 1}")
    return digests


def _share_buffers(model: GlanceFocus, dist: DistEnv) -> None:
    """Under torchrun every process takes the main process's buffers (the BatchNorm statistics, which DDP does not
    average): all processes leave a stage with the model the main process saved."""
    if dist.distributed:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _start_epoch(loader: DataLoader, cfg: StageConfig, stage: int, epoch: int) -> None:
    """Random streams of this process, stage and epoch, and this epoch's shuffle of the sampler: a resumed stage
    draws what an uninterrupted one would."""
    seed = cfg.work.seed + stage
    utils.seed_everything(epoch_seed(seed, epoch, cfg.dist.rank))
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, cfg.dist.rank, stream=1))


class _Stage:
    """One stage's training state (optimizer, schedule, scaler), resume point, guard and run folder files."""

    def __init__(self, model: GlanceFocus, stage: int, loader: DataLoader, cfg: StageConfig, run_dir: Path,
                 log: Callable[[str], None]):
        self.model, self.stage, self.loader, self.cfg, self.log = model, stage, loader, cfg, log
        self.path, self.run_dir = Path(run_dir) / f"stage{stage}.pth", Path(run_dir)
        optimizer = torch.optim.AdamW(stage_params(model, stage), lr=cfg.lr,
                                      weight_decay=0.0 if stage == 2 else cfg.stages.weight_decay,
                                      fused=cfg.device.type == "cuda" or FUSED_ADAMW_ON_CPU)
        accumulation = 1 if stage == 2 else cfg.stages.accumulation_steps
        self.updates_per_epoch = math.ceil(len(loader) / accumulation)
        scheduler = build_scheduler(optimizer, cfg.schedule(), cfg.work.seed, self.updates_per_epoch)
        self.state = TrainingState(optimizer, scheduler, grad_scaler(cfg.amp, cfg.device) if stage != 2 else None)
        schedule = section_values(cfg.schedule())
        self.args = {**{k: schedule[k] for k in SCHEDULE_ARGS if k in schedule}, "scaled_lr": cfg.lr,
                     "stage": stage}
        self.record = self._resume()
        self.guard = DivergenceGuard(self.run_dir, self.record["epoch"] > 0, part={"stage": stage},
                                     advice=GUARD_ADVICE)

    def _resume(self) -> dict[str, Any]:
        """The stage's record, with the model and the training state restored from ``stage<N>.pth`` if it exists."""
        if not self.path.is_file():
            return {"stage": self.stage, "epoch": 0, "done": False, "seconds": 0.0, "history": []}
        raw = load_checkpoint_file(self.path)
        self.model.load_state_dict(raw["model"])
        self.state.restore(ResumePoint(self.path, raw), self.args)
        record = raw["record"]
        self.state.scheduler.step_update(record["epoch"] * self.updates_per_epoch)
        self.log(f"stage {self.stage}: resuming after epoch {record['epoch']} from {self.path}")
        return record

    def run_epoch(self, net: nn.Module, criterion: AnytimeLoss, epoch: int) -> dict[str, Any]:
        """Train one epoch; returns its log record (``first_loss``: the first step's loss, for the guard)."""
        cfg, stage = self.cfg, self.stage
        _start_epoch(self.loader, cfg, stage, epoch)
        header = f"stage {stage} epoch {epoch + 1}/{cfg.epochs}"
        on_update = lambda n: self.state.scheduler.step_update(epoch * self.updates_per_epoch + n)  # noqa: E731
        if stage == 2:
            stats = policy_epoch(self.model, net, self.loader, self.state.optimizer, cfg, header, on_update)
            return {"stage": stage, "epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["loss"],
                    "reward": stats["reward"], "first_loss": stats["first_loss"]}
        stats = train_one_epoch(net, criterion, self.loader, self.state.optimizer, cfg.device, epoch,
                                loss_scaler=self.state.scaler, amp_dtype=amp_dtype(cfg.amp, cfg.device),
                                accumulation_steps=cfg.stages.accumulation_steps, print_freq=cfg.work.print_freq,
                                header=header, on_update=on_update, advice=GUARD_ADVICE)
        return {"stage": stage, "epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["loss"],
                "train_acc1": criterion.accuracy(cfg.device), "first_loss": stats["first_loss"]}

    def save(self, record: dict[str, Any], seconds: float) -> None:
        """Check the epoch (guard, finite weights), then save ``stage<N>.pth`` and its ``train_log.txt`` record."""
        first_loss = record.pop("first_loss")
        self.guard.check(record, first_loss)
        check_finite_weights(self.model, record["epoch"])
        rec = self.record
        rec["history"].append(record["reward"] if self.stage == 2 else record["train_loss"])
        rec["seconds"] += seconds
        rec["epoch"], rec["done"] = record["epoch"], record["epoch"] == self.cfg.epochs
        value = f"reward {record['reward']:.4f}" if self.stage == 2 else f"loss {record['train_loss']:.4f}"
        self.log(f"stage {self.stage} epoch {record['epoch']}: {value}")
        rec["process_digests"] = _agreement(self.model, self.stage, record["epoch"] - 1, self.log)
        if self.cfg.dist.is_main:
            state = self.state
            save_checkpoint_atomic({"model": self.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                                    "lr_scheduler": state.scheduler.state_dict(), "args": self.args,
                                    "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                                    "record": rec}, self.path)
            append_log_record(self.run_dir, {**record, "time": seconds})
        self.cfg.dist.barrier()

    def report(self) -> None:
        """``stage<N>/report.html``: the stage's loss, accuracy (stage 2: reward) and learning-rate curves."""
        if not self.cfg.dist.is_main:
            return
        by_epoch = {r["epoch"]: r for r in read_log_records(self.run_dir) if r.get("stage") == self.stage}
        records = [by_epoch[e] for e in sorted(by_epoch) if e <= self.record["epoch"]]
        key = "reward" if self.stage == 2 else "train_acc1"
        summary = f"stage {self.stage}: {self.record['epoch']} epochs in {self.record['seconds']:.0f} s"
        try:
            (self.run_dir / f"stage{self.stage}").mkdir(exist_ok=True)
            path = write_report(self.run_dir / f"stage{self.stage}", records, [], None, key, summary,
                                metric_keys=[key])
        except (OSError, ValueError, RuntimeError) as err:
            self.log(f"warning: the stage {self.stage} report could not be written ({err}); the stage is saved")
            return
        self.log(f"stage {self.stage} report: {path}")


def run_stage(model: GlanceFocus, stage: int, loader: DataLoader, cfg: StageConfig, run_dir: Path,
              log: Callable[[str], None] = utils.print_main) -> dict:
    """Train ``stage`` for ``cfg.epochs`` epochs, resuming from ``run_dir/stage<N>.pth``; returns its record.

    Under torchrun ``loader`` holds this process's shard (a :class:`DistributedSampler`, set to each epoch).
    """
    if len(loader) == 0:
        raise UserError("the training split holds no images; check --data-path")
    runner = _Stage(model, stage, loader, cfg, run_dir, log)
    _enter_stage(model, stage)
    net = wrap_model(model.policy if stage == 2 else StageNet(model, stage), cfg.dist)
    criterion = AnytimeLoss()
    try:
        for epoch in range(runner.record["epoch"], cfg.epochs):
            start = time.perf_counter()
            record = runner.run_epoch(net, criterion, epoch)
            runner.save(record, time.perf_counter() - start)
    finally:
        model.requires_grad_(True)
    _share_buffers(model, cfg.dist)
    runner.report()
    runner.record["done"] = True
    return runner.record
