"""The three GFNet training stages as plain single-process loops (CPU or one GPU, AMP, gradient accumulation).

1. Encoders and recurrent classifier, with uniformly random crop centres; the loss is the cross-entropy of every
   step's logits (anytime). 2. The patch policy with PPO, everything else frozen; the reward of a step is the increase
   of the true class's probability. 3. The recurrent classifier fine-tuned with the learned policy (its mean centres),
   encoders frozen. Each stage keeps its state in ``stage<N>.pth`` of the run folder after every epoch and resumes.
"""

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from artifacts.checkpoint import load_checkpoint_file, save_checkpoint_atomic
from model.glance_focus import GlanceFocus
from utils import Progress, UserError

__all__ = ["TrainConfig", "anytime_loss", "classifier_epoch", "collect_rollout", "ppo_update", "policy_epoch",
           "run_stage", "stage_params"]


@dataclass
class TrainConfig:
    """What every stage's loop needs."""

    epochs: int
    lr: float
    device: torch.device
    amp: bool = False
    accumulation_steps: int = 1
    weight_decay: float = 0.05
    ppo_epochs: int = 4
    ppo_clip: float = 0.2
    gamma: float = 0.7
    entropy_coef: float = 0.01


def autocast(cfg: TrainConfig) -> torch.autocast:
    """Mixed precision when ``--amp``: bfloat16 on the CPU, float16 on CUDA."""
    dtype = torch.float16 if cfg.device.type == "cuda" else torch.bfloat16
    return torch.autocast(cfg.device.type, dtype=dtype, enabled=cfg.amp)


def anytime_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the (T+1, N, K) logits of every step."""
    steps = logits.shape[0]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(steps))


def stage_params(model: GlanceFocus, stage: int) -> list[nn.Parameter]:
    """Trainable parameters of a stage: 1 encoders + classifier, 2 the policy, 3 the classifier."""
    modules = {1: [model.global_encoder, model.local_encoder, model.classifier], 2: [model.policy],
               3: [model.classifier]}[stage]
    return [p for m in modules for p in m.parameters()]


def _set_mode(model: GlanceFocus, stage: int) -> None:
    """Train mode for the stage's trainable modules only (frozen encoders keep their BatchNorm statistics)."""
    model.eval()
    for module in {1: [model.global_encoder, model.local_encoder, model.classifier], 2: [model.policy],
                   3: [model.classifier]}[stage]:
        module.train()


def _batches(loader: Iterable, device: torch.device):
    for (glance, focus), labels in loader:
        yield glance.to(device, non_blocking=True), focus.to(device, non_blocking=True), labels.to(device)


def classifier_epoch(model: GlanceFocus, loader, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     cfg: TrainConfig, stage: int, progress: Progress) -> float:
    """One epoch of stage 1 (random centres) or 3 (the learned policy's centres); returns the mean loss."""
    _set_mode(model, stage)
    policy = "random" if stage == 1 else "learned"
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, (glance, focus, labels) in enumerate(_batches(loader, cfg.device)):
        with autocast(cfg):
            out = model(glance, focus, policy=policy)
        loss = anytime_loss(out.logits, labels)
        scaler.scale(loss / cfg.accumulation_steps).backward()
        if (i + 1) % cfg.accumulation_steps == 0 or i + 1 == len(loader):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        total, count = total + loss.item() * len(labels), count + len(labels)
        progress.update(len(labels), lr=optimizer.param_groups[0]["lr"], loss=loss.item())
    return total / max(count, 1)


@torch.no_grad()
def collect_rollout(model: GlanceFocus, glance: torch.Tensor, focus: torch.Tensor, labels: torch.Tensor,
                    cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Sampled episodes: states, actions, old log-probs, values, discounted returns of the GFNet reward."""
    with autocast(cfg):
        out = model(glance, focus, policy="sample")
    true_prob = out.logits.float().softmax(-1)[:, torch.arange(len(labels)), labels]  # (T+1, N)
    rewards = true_prob[1:] - true_prob[:-1]
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + cfg.gamma * running
        returns[t] = running
    return {"states": out.states.flatten(0, 1), "actions": out.centres.flatten(0, 1).float(),
            "log_probs": out.log_probs.flatten(0, 1), "values": out.values.flatten(0, 1),
            "returns": returns.flatten(0, 1), "rewards": rewards}


def ppo_update(model: GlanceFocus, rollout: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> float:
    """``cfg.ppo_epochs`` clipped-surrogate updates of the actor-critic on one rollout; returns the last loss."""
    advantages = rollout["returns"] - rollout["values"]
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8) if len(advantages) > 1 else advantages
    loss = torch.zeros(())
    for _ in range(cfg.ppo_epochs):
        dist, values = model.policy(rollout["states"])
        ratio = (dist.log_prob(rollout["actions"]).sum(1) - rollout["log_probs"]).exp()
        clipped = ratio.clamp(1 - cfg.ppo_clip, 1 + cfg.ppo_clip)
        actor = -torch.min(ratio * advantages, clipped * advantages).mean()
        critic = F.mse_loss(values, rollout["returns"])
        loss = actor + 0.5 * critic - cfg.entropy_coef * dist.entropy().sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def policy_epoch(model: GlanceFocus, loader, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 cfg: TrainConfig, stage: int, progress: Progress) -> float:
    """One epoch of stage 2 (PPO); returns the mean reward per step (the true-class probability gained)."""
    _set_mode(model, 2)
    total, count = 0.0, 0
    for glance, focus, labels in _batches(loader, cfg.device):
        rollout = collect_rollout(model, glance, focus, labels, cfg)
        loss = ppo_update(model, rollout, optimizer, cfg)
        reward = rollout["rewards"].mean().item()
        total, count = total + reward * len(labels), count + len(labels)
        progress.update(len(labels), lr=optimizer.param_groups[0]["lr"], loss=loss, reward=reward)
    return total / max(count, 1)


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, epoch: int, epochs: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


EpochFn = Callable[..., float]


def run_stage(model: GlanceFocus, stage: int, loader, cfg: TrainConfig, run_dir: Path,
              log: Callable[[str], None] = print) -> dict:
    """Train ``stage`` for ``cfg.epochs`` epochs, resuming from ``run_dir/stage<N>.pth``; returns its record."""
    path = Path(run_dir) / f"stage{stage}.pth"
    params = stage_params(model, stage)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0 if stage == 2 else cfg.weight_decay)
    scaler = torch.amp.GradScaler(cfg.device.type, enabled=cfg.amp and cfg.device.type == "cuda")
    record = {"stage": stage, "epoch": 0, "done": False, "seconds": 0.0, "history": []}
    if path.is_file():
        state = load_checkpoint_file(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        record = state["record"]
        log(f"stage {stage}: resuming after epoch {record['epoch']} from {path}")
    if len(loader) == 0:
        raise UserError("the training split holds no images; check --data-path")
    epoch_fn: EpochFn = policy_epoch if stage == 2 else classifier_epoch
    for epoch in range(record["epoch"], cfg.epochs):
        _cosine_lr(optimizer, cfg.lr, epoch, cfg.epochs)
        start = time.perf_counter()
        progress = Progress(len(loader), f"stage {stage} epoch {epoch + 1}/{cfg.epochs}")
        value = epoch_fn(model, loader, optimizer, scaler, cfg, stage, progress)
        progress.close()
        record["history"].append(value)
        record["seconds"] += time.perf_counter() - start
        record["epoch"], record["done"] = epoch + 1, epoch + 1 == cfg.epochs
        log(f"stage {stage} epoch {epoch + 1}: {'reward' if stage == 2 else 'loss'} {value:.4f}")
        save_checkpoint_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "record": record}, path)
    record["done"] = True
    return record
