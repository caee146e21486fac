"""Stage 2 of glance and focus: the patch policy trained with PPO, everything else frozen.

A step's reward is the increase of the true class's probability. Each process samples its own episodes; the
policy (maybe in DistributedDataParallel) averages its gradients over the processes.
"""

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import utils
from gfnet.config import StageConfig
from model.glance_focus import GlanceFocus
from training.trainer import amp_dtype

__all__ = ["collect_rollout", "policy_epoch", "ppo_update"]


def _autocast(cfg: StageConfig) -> torch.autocast:
    dtype = amp_dtype(cfg.amp, cfg.device)
    return torch.autocast(cfg.device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def collect_rollout(model: GlanceFocus, glance: torch.Tensor, focus: torch.Tensor, labels: torch.Tensor,
                    cfg: StageConfig) -> dict[str, torch.Tensor]:
    """Sampled episodes: states, actions, old log-probs, values, discounted returns of the GFNet reward."""
    with _autocast(cfg):
        out = model(glance, focus, policy="sample")
    true_prob = out.logits.float().softmax(-1)[:, torch.arange(len(labels)), labels]  # (T+1, N)
    rewards = true_prob[1:] - true_prob[:-1]
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + cfg.ppo.gamma * running
        returns[t] = running
    return {"states": out.states.flatten(0, 1).float(), "actions": out.centres.flatten(0, 1).float(),
            "log_probs": out.log_probs.flatten(0, 1).float(), "values": out.values.flatten(0, 1).float(),
            "returns": returns.flatten(0, 1), "rewards": rewards}


def ppo_update(policy: nn.Module, rollout: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               cfg: StageConfig) -> float:
    """``--ppo-epochs`` clipped-surrogate updates of the actor-critic ``policy`` (maybe in DDP) on one rollout;
    returns the last loss."""
    ppo = cfg.ppo
    advantages = rollout["returns"] - rollout["values"]
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8) if len(advantages) > 1 else advantages
    loss = torch.zeros(())
    for _ in range(ppo.ppo_epochs):
        gauss, values = policy(rollout["states"])
        ratio = (gauss.log_prob(rollout["actions"]).sum(1) - rollout["log_probs"]).exp()
        clipped = ratio.clamp(1 - ppo.ppo_clip, 1 + ppo.ppo_clip)
        actor = -torch.min(ratio * advantages, clipped * advantages).mean()
        critic = F.mse_loss(values, rollout["returns"])
        loss = actor + 0.5 * critic - ppo.entropy_coef * gauss.entropy().sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def _batches(loader: Iterable, device: torch.device):
    for (glance, focus), labels in loader:
        yield glance.to(device, non_blocking=True), focus.to(device, non_blocking=True), labels.to(device)


def policy_epoch(model: GlanceFocus, policy: nn.Module, loader, optimizer: torch.optim.Optimizer, cfg: StageConfig,
                 header: str, on_update: Callable[[int], None]) -> dict[str, float]:
    """One epoch of stage 2: each process samples episodes of its batches with ``model`` and updates ``policy`` (the
    model's policy, maybe in DDP) with PPO; ``on_update(n)`` after the n-th rollout (the schedule). Returns the mean
    PPO ``loss`` and ``reward`` per step (the true-class probability gained) over the processes, the last ``lr`` and
    the ``first_loss``."""
    progress = utils.Progress(len(loader), header, cfg.work.print_freq)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, reward, images
    first_loss = math.nan
    for step, (glance, focus, labels) in enumerate(_batches(loader, cfg.device)):
        rollout = collect_rollout(model, glance, focus, labels, cfg)
        loss = ppo_update(policy, rollout, optimizer, cfg)
        on_update(step + 1)
        reward = rollout["rewards"].mean().item()
        first_loss = loss if step == 0 else first_loss
        sums += torch.tensor([loss * len(labels), reward * len(labels), len(labels)], dtype=torch.float64)
        progress.update(len(labels) * cfg.dist.world_size, lr=optimizer.param_groups[0]["lr"], loss=loss,
                        reward=reward)
    progress.close()
    sums = utils.all_reduce_sum(sums.to(cfg.device)).cpu()
    count = sums[2].clamp(min=1)
    return {"loss": (sums[0] / count).item(), "reward": (sums[1] / count).item(),
            "lr": optimizer.param_groups[0]["lr"], "first_loss": first_loss}
