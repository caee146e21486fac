"""Process-group set-up for ``torchrun`` training: :func:`start_process` (the :class:`DistEnv` and
:func:`init_distributed` it builds on live in :mod:`utils`, shared with sharded inference)."""

import torch

import utils
from utils import DistEnv, init_distributed

__all__ = ["DistEnv", "init_distributed", "start_process"]


def start_process(device_name: str | None, seed: int) -> DistEnv:
    """:func:`init_distributed`, then seed every RNG with ``seed`` and let cuDNN pick its fastest kernels."""
    dist = init_distributed(device_name)
    utils.seed_everything(seed)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dist
