"""Data loaders whose order depends only on (seed, epoch, rank), so a resumed run sees the same data."""

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

import utils
from data.samplers import ClassBalancedSampler, EpochRepeats, RASampler
from training.config import SamplerConfig
from training.distributed import DistEnv
from utils import UserError

__all__ = ["Loaders", "build_loaders"]


@dataclass
class Loaders:
    """The training loader (None for ``--eval``), the validation loader, and the generator of the training
    workers' seeds (re-seeded every epoch)."""

    train: DataLoader | None
    val: DataLoader
    generator: torch.Generator


def build_loaders(dataset_train: Dataset | None, dataset_val: Dataset, dist: DistEnv, *, batch_size: int,
                  num_workers: int, seed: int, repeated_aug: bool = True, pin_memory: bool = True,
                  dist_eval: bool = False, sampler: SamplerConfig | None = None) -> Loaders:
    """Samplers seeded by seed + epoch (``ClassBalancedSampler`` with a class-balanced ``sampler``, else
    ``RASampler`` with ``repeated_aug``; the sampler's ``epoch_repeats`` passes of it per epoch), validation
    batches of 1.5 x ``batch_size``, split over the processes with ``dist_eval``; memory pinned only on CUDA."""
    pin = pin_memory and dist.device.type == "cuda"
    generator = torch.Generator()
    loader_train = None
    if dataset_train is not None:
        if sampler is not None and sampler.name == "class-balanced":
            train_sampler = ClassBalancedSampler(dataset_train.targets, sampler.samples_per_class,
                                                 num_replicas=dist.world_size, rank=dist.rank, seed=seed)
        elif repeated_aug:
            train_sampler = RASampler(dataset_train, num_replicas=dist.world_size, rank=dist.rank, seed=seed)
        else:
            train_sampler = DistributedSampler(dataset_train, num_replicas=dist.world_size, rank=dist.rank,
                                               shuffle=True, seed=seed)
        if sampler is not None and sampler.epoch_repeats > 1:
            train_sampler = EpochRepeats(train_sampler, sampler.epoch_repeats)
        loader_train = DataLoader(dataset_train, batch_size=batch_size, sampler=train_sampler,
                                  num_workers=num_workers, pin_memory=pin, drop_last=True, generator=generator)
        if len(loader_train) == 0:
            raise UserError(f"{len(train_sampler)} training images per process are fewer than --batch-size "
                            f"{batch_size}; lower --batch-size (or use fewer processes)")
    if dist.distributed and dist_eval:
        if len(dataset_val) % dist.world_size:
            utils.print_main(f"note: {len(dataset_val)} validation images do not split evenly over "
                             f"{dist.world_size} processes: a few are counted twice (drop --dist-eval for exact "
                             "numbers)")
        val_sampler = DistributedSampler(dataset_val, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    else:
        val_sampler = SequentialSampler(dataset_val)
    # Own generator: validation does not draw from the global RNG, so --eval-every leaves training unchanged.
    loader_val = DataLoader(dataset_val, batch_size=int(1.5 * batch_size), sampler=val_sampler,
                            num_workers=num_workers, pin_memory=pin, drop_last=False,
                            generator=torch.Generator().manual_seed(seed))
    return Loaders(loader_train, loader_val, generator)
