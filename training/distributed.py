"""Process-group set-up for ``torchrun``: :func:`init_distributed` returns a small :class:`DistEnv`."""

import os
from dataclasses import dataclass

import torch

import utils
from utils import UserError

__all__ = ["DistEnv", "init_distributed", "start_process"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank, process count, local rank (its GPU) and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (nothing in a single process)."""
        if self.distributed:
            torch.distributed.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def init_distributed(device_name: str | None) -> DistEnv:
    """Join the process group when started by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment).

    The device is ``device_name`` (default: CUDA when available); under torchrun on CUDA it is ``cuda:LOCAL_RANK``
    with the nccl backend, else the gloo backend (CPU, and Windows, which has no nccl).
    """
    device = utils.resolve_device(device_name)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size <= 1:
        return DistEnv(rank, world_size, local_rank, device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at "
                            "most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" and torch.distributed.is_nccl_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank)
    if rank == 0:
        print(f"distributed: {world_size} processes, backend {backend}", flush=True)
    return DistEnv(rank, world_size, local_rank, device)


def start_process(device_name: str | None, seed: int) -> DistEnv:
    """:func:`init_distributed`, then seed every RNG with ``seed`` and let cuDNN pick its fastest kernels."""
    dist = init_distributed(device_name)
    utils.seed_everything(seed)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dist
