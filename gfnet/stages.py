"""The three GFNet training stages (CPU or GPU, AMP, gradient accumulation, DistributedDataParallel under torchrun).

1. Encoders and recurrent classifier, with uniformly random crop centres; the loss is the cross-entropy of every
   step's logits (anytime). 2. The patch policy with PPO, everything else frozen; the reward of a step is the increase
   of the true class's probability. 3. The recurrent classifier fine-tuned with the learned policy (its mean centres),
   encoders frozen. Each stage keeps its state in ``stage<N>.pth`` of the run folder after every epoch and resumes.
Under torchrun each process trains on its shard of the data; what a stage trains (the whole model with its frozen
parts excluded, or the policy) is wrapped in DistributedDataParallel, so the gradients, and with them the weights,
agree between processes; each process computes its own PPO rollouts and rewards. The main process writes the files.
"""

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import utils
from artifacts.checkpoint import load_checkpoint_file, save_checkpoint_atomic
from model.glance_focus import GlanceFocus
from training.distributed import DistEnv
from training.resume import epoch_seed
from utils import Progress, UserError

__all__ = ["TrainConfig", "anytime_loss", "classifier_epoch", "collect_rollout", "ppo_update", "policy_epoch",
           "parameter_digest", "run_stage", "stage_params"]

# torch < 2.4 has no fused AdamW on the CPU (requirements.txt allows torch 2.1); it is about 3x faster where it exists
FUSED_ADAMW_ON_CPU = torch.__version__ >= (2, 4)
STAGE_MODULES = {1: ("global_encoder", "local_encoder", "classifier"), 2: ("policy",), 3: ("classifier",)}


@dataclass
class TrainConfig:
    """What every stage's loop needs; ``dist`` is this process's place in a torchrun run (and its device)."""

    epochs: int
    lr: float
    dist: DistEnv = field(default_factory=DistEnv)
    amp: bool = False
    accumulation_steps: int = 1
    weight_decay: float = 0.05
    ppo_epochs: int = 4
    ppo_clip: float = 0.2
    gamma: float = 0.7
    entropy_coef: float = 0.01
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return self.dist.device


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
    return [p for name in STAGE_MODULES[stage] for p in getattr(model, name).parameters()]


def _enter_stage(model: GlanceFocus, stage: int) -> None:
    """Train mode and gradients for the stage's modules only (frozen encoders keep their BatchNorm statistics and
    compute no gradients); :func:`run_stage` gives every parameter its gradient back when the stage ends."""
    model.eval().requires_grad_(False)
    for name in STAGE_MODULES[stage]:
        getattr(model, name).train().requires_grad_(True)


def _wrap(module: nn.Module, dist: DistEnv) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun (its frozen parameters are not synchronised)."""
    if not dist.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def _batches(loader: Iterable, device: torch.device):
    for (glance, focus), labels in loader:
        yield glance.to(device, non_blocking=True), focus.to(device, non_blocking=True), labels.to(device)


def _mean_over_processes(total: float, count: int, device: torch.device) -> float:
    """``total / count`` summed over the processes (every process gets the same value)."""
    sums = utils.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
    return (sums[0] / sums[1].clamp(min=1)).item()


def classifier_epoch(net: nn.Module, loader, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     cfg: TrainConfig, stage: int, progress: Progress) -> float:
    """One epoch of stage 1 (random centres) or 3 (the learned policy's centres) of ``net`` (the model, maybe in
    DDP; non-final micro-batches of an accumulation group skip the gradient all-reduce); returns the mean loss."""
    policy = "random" if stage == 1 else "learned"
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, (glance, focus, labels) in enumerate(_batches(loader, cfg.device)):
        update = (i + 1) % cfg.accumulation_steps == 0 or i + 1 == len(loader)
        with nullcontext() if update or not isinstance(net, DistributedDataParallel) else net.no_sync():
            with autocast(cfg):
                out = net(glance, focus, policy=policy)
            loss = anytime_loss(out.logits, labels)
            scaler.scale(loss / cfg.accumulation_steps).backward()
        if update:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        total, count = total + loss.item() * len(labels), count + len(labels)
        progress.update(len(labels) * cfg.dist.world_size, lr=optimizer.param_groups[0]["lr"], loss=loss.item())
    return _mean_over_processes(total, count, cfg.device)


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


def ppo_update(policy: nn.Module, rollout: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> float:
    """``cfg.ppo_epochs`` clipped-surrogate updates of the actor-critic ``policy`` (maybe in DDP) on one rollout;
    returns the last loss."""
    advantages = rollout["returns"] - rollout["values"]
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8) if len(advantages) > 1 else advantages
    loss = torch.zeros(())
    for _ in range(cfg.ppo_epochs):
        gauss, values = policy(rollout["states"])
        ratio = (gauss.log_prob(rollout["actions"]).sum(1) - rollout["log_probs"]).exp()
        clipped = ratio.clamp(1 - cfg.ppo_clip, 1 + cfg.ppo_clip)
        actor = -torch.min(ratio * advantages, clipped * advantages).mean()
        critic = F.mse_loss(values, rollout["returns"])
        loss = actor + 0.5 * critic - cfg.entropy_coef * gauss.entropy().sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def policy_epoch(model: GlanceFocus, policy: nn.Module, loader, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 progress: Progress) -> float:
    """One epoch of stage 2: each process samples episodes of its batches with ``model`` and updates ``policy`` (the
    model's policy, maybe in DDP) with PPO; returns the mean reward per step (the true-class probability gained)."""
    total, count = 0.0, 0
    for glance, focus, labels in _batches(loader, cfg.device):
        rollout = collect_rollout(model, glance, focus, labels, cfg)
        loss = ppo_update(policy, rollout, optimizer, cfg)
        reward = rollout["rewards"].mean().item()
        total, count = total + reward * len(labels), count + len(labels)
        progress.update(len(labels) * cfg.dist.world_size, lr=optimizer.param_groups[0]["lr"], loss=loss,
                        reward=reward)
    return _mean_over_processes(total, count, cfg.device)


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, epoch: int, epochs: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def _start_epoch(loader: DataLoader, cfg: TrainConfig, stage: int, epoch: int) -> None:
    """Random streams of this process, stage and epoch, and this epoch's shuffle of the sampler: a resumed stage
    draws what an uninterrupted one would."""
    utils.seed_everything(epoch_seed(cfg.seed + stage, epoch, cfg.dist.rank))
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(cfg.seed + stage, epoch, cfg.dist.rank, stream=1))


def _run_epoch(model: GlanceFocus, net: nn.Module, stage: int, loader: DataLoader, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, cfg: TrainConfig, epoch: int) -> float:
    _start_epoch(loader, cfg, stage, epoch)
    _cosine_lr(optimizer, cfg.lr, epoch, cfg.epochs)
    progress = Progress(len(loader), f"stage {stage} epoch {epoch + 1}/{cfg.epochs}")
    if stage == 2:
        value = policy_epoch(model, net, loader, optimizer, cfg, progress)
    else:
        value = classifier_epoch(net, loader, optimizer, scaler, cfg, stage, progress)
    progress.close()
    return value


def _resume(model: GlanceFocus, optimizer: torch.optim.Optimizer, path: Path, stage: int,
            log: Callable[[str], None]) -> dict:
    """The stage's record, with model and optimizer restored from ``path`` when it exists."""
    if not path.is_file():
        return {"stage": stage, "epoch": 0, "done": False, "seconds": 0.0, "history": []}
    state = load_checkpoint_file(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"stage {stage}: resuming after epoch {state['record']['epoch']} from {path}")
    return state["record"]


def _share_buffers(model: GlanceFocus, dist: DistEnv) -> None:
    """Under torchrun every process takes the main process's buffers (the BatchNorm statistics, which DDP does not
    average): all processes leave a stage with the model the main process saved."""
    if dist.distributed:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


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


def run_stage(model: GlanceFocus, stage: int, loader: DataLoader, cfg: TrainConfig, run_dir: Path,
              log: Callable[[str], None] = utils.print_main) -> dict:
    """Train ``stage`` for ``cfg.epochs`` epochs, resuming from ``run_dir/stage<N>.pth``; returns its record.

    Under torchrun ``loader`` holds this process's shard (a :class:`DistributedSampler`, set to each epoch); the
    main process saves the stage after every epoch, with every process's parameter digest, while the others wait.
    """
    if len(loader) == 0:
        raise UserError("the training split holds no images; check --data-path")
    path = Path(run_dir) / f"stage{stage}.pth"
    optimizer = torch.optim.AdamW(stage_params(model, stage), lr=cfg.lr,
                                  weight_decay=0.0 if stage == 2 else cfg.weight_decay,
                                  fused=cfg.device.type == "cuda" or FUSED_ADAMW_ON_CPU)
    scaler = torch.amp.GradScaler(cfg.device.type, enabled=cfg.amp and cfg.device.type == "cuda")
    record = _resume(model, optimizer, path, stage, log)
    _enter_stage(model, stage)
    net = _wrap(model.policy if stage == 2 else model, cfg.dist)
    try:
        for epoch in range(record["epoch"], cfg.epochs):
            start = time.perf_counter()
            value = _run_epoch(model, net, stage, loader, optimizer, scaler, cfg, epoch)
            record["history"].append(value)
            record["seconds"] += time.perf_counter() - start
            record["epoch"], record["done"] = epoch + 1, epoch + 1 == cfg.epochs
            log(f"stage {stage} epoch {epoch + 1}: {'reward' if stage == 2 else 'loss'} {value:.4f}")
            record["process_digests"] = _agreement(model, stage, epoch, log)
            if cfg.dist.is_main:
                save_checkpoint_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "record": record}, path)
            cfg.dist.barrier()
    finally:
        model.requires_grad_(True)
    _share_buffers(model, cfg.dist)
    record["done"] = True
    return record
