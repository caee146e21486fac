"""Compute per step: GFLOPs of the glance step and of each focus step, counted with ``flops.py``'s SKA handle."""

import torch

from model.glance_focus import GlanceFocus
from perf.flop_count import count_flops

__all__ = ["step_gflops", "encoder_gflops", "cumulative_gflops"]


def encoder_gflops(encoder: torch.nn.Module, size: int) -> float:
    """GFLOPs of one ``size`` x ``size`` image through an LSNet encoder (fvcore, SKA counted)."""
    param = next(encoder.parameters())
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        flops = count_flops(encoder, (torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype),)).total()
    encoder.train(was_training)
    return flops / 1e9


def _head_flops(model: GlanceFocus, input_dim: int, with_policy: bool) -> int:
    """Multiply-adds of the projection, GRU cell, classifier head and (for focus steps) the policy's MLPs."""
    hidden = model.classifier.hidden_dim
    flops = input_dim * hidden + 3 * 2 * hidden * hidden + hidden * model.num_classes
    if with_policy:
        state_dim = model.policy.actor[0].in_features
        flops += 2 * state_dim * 256 + 256 * 3
    return flops


def step_gflops(model: GlanceFocus) -> list[float]:
    """GFLOPs of step 0 (the glance) and of steps 1..T (one crop each), for one image."""
    glance = encoder_gflops(model.global_encoder, model.glance_size)
    glance += _head_flops(model, model.global_encoder.num_features, False) / 1e9
    focus = encoder_gflops(model.local_encoder, model.patch_size)
    focus += _head_flops(model, model.local_encoder.num_features, True) / 1e9
    return [glance] + [focus] * model.focus_steps


def cumulative_gflops(per_step: list[float]) -> list[float]:
    """GFLOPs spent when stopping after each step."""
    out, total = [], 0.0
    for value in per_step:
        total += value
        out.append(total)
    return out
