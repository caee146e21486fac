"""Samplers: repeated augmentation (DeiT ``RASampler``), artist-balanced batches (``ClassBalancedSampler``) and the
distributed / single-process choice."""

import math
from collections.abc import Iterator, Sequence, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

__all__ = ["ClassBalancedSampler", "EpochRepeats", "RASampler", "build_sampler"]


class RASampler(Sampler[int]):
    """Repeated augmentation: each image appears ``num_repeats`` times per epoch, the copies on different ranks.

    Every rank yields ``ceil(len(dataset) / num_replicas)`` indices per epoch, so an epoch has the usual length
    while each image gets several differently augmented views. Works single-process too (then the repeats are
    consecutive in the shuffled order). Call :meth:`set_epoch` every epoch for a new order.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, num_repeats: int = 3, seed: int = 0):
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if distributed else 1
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be at least 1, got {num_repeats}")
        self.dataset, self.shuffle, self.num_repeats, self.seed = dataset, shuffle, num_repeats, seed
        self.epoch = 0
        # Repeated indices are padded to a multiple of the replicas, then dealt out round-robin.
        self.num_samples = math.ceil(len(dataset) * num_repeats / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.num_selected_samples = math.ceil(len(dataset) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        indices = [i for i in order for _ in range(self.num_repeats)]
        if indices and len(indices) < self.total_size:
            indices = (indices * math.ceil(self.total_size / len(indices)))[: self.total_size]
        return iter(indices[self.rank:self.total_size:self.num_replicas][: self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ClassBalancedSampler(Sampler[int]):
    """Artist-balanced sampling: every class gets the same number of groups of ``samples_per_class`` images.

    An epoch has about ``len(labels)`` indices: ``ceil(len / (classes x K))`` groups of K per class, a class's
    images reshuffled and reused when it has fewer. The groups are shuffled (seeded by ``seed + epoch``) and dealt
    out round-robin to the ``num_replicas`` processes, so each process gets a distinct shard made of whole groups:
    with a batch size that is a multiple of K every batch holds K images of each of its classes. Call
    :meth:`set_epoch` every epoch.
    """

    def __init__(self, labels: Sequence[int], samples_per_class: int, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if distributed else 1
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be at least 1, got {samples_per_class}")
        by_class: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            by_class.setdefault(int(label), []).append(index)
        if not by_class:
            raise ValueError("ClassBalancedSampler needs a non-empty dataset")
        self.by_class = [by_class[label] for label in sorted(by_class)]
        self.samples_per_class, self.seed, self.epoch = samples_per_class, seed, 0
        self.groups_per_class = math.ceil(len(labels) / (len(self.by_class) * samples_per_class))
        self.groups_per_replica = math.ceil(len(self.by_class) * self.groups_per_class / self.num_replicas)

    def _class_groups(self, indices: list[int], generator: torch.Generator) -> list[list[int]]:
        """``groups_per_class`` groups of K of ``indices``: shuffled passes over them, as many as needed."""
        wanted = self.groups_per_class * self.samples_per_class
        stream: list[int] = []
        while len(stream) < wanted:
            stream += [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        k = self.samples_per_class
        return [stream[start:start + k] for start in range(0, wanted, k)]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        groups = [group for indices in self.by_class for group in self._class_groups(indices, generator)]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        total = self.groups_per_replica * self.num_replicas
        groups = (groups * math.ceil(total / len(groups)))[:total]  # pad by reusing the first groups
        return iter([index for group in groups[self.rank::self.num_replicas] for index in group])

    def __len__(self) -> int:
        return self.groups_per_replica * self.samples_per_class

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class EpochRepeats(Sampler[int]):
    """``repeats`` passes of ``sampler`` per epoch, each in its own order (the base sampler's epoch
    ``epoch * repeats + pass``): small data gets more optimizer steps per epoch, each image differently augmented in
    every pass."""

    def __init__(self, sampler: Sampler[int], repeats: int):
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.sampler, self.repeats, self.epoch = sampler, repeats, 0

    def __iter__(self) -> Iterator[int]:
        for done in range(self.repeats):
            self.sampler.set_epoch(self.epoch * self.repeats + done)
            yield from self.sampler

    def __len__(self) -> int:
        return len(self.sampler) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def build_sampler(dataset: Sized, is_train: bool, repeated_aug: bool = False, dist_eval: bool = False,
                  seed: int = 0) -> Sampler[int]:
    """The sampler for a loader: distributed when ``torch.distributed`` is initialised, else single-process.

    Training shuffles (with :class:`RASampler` when ``repeated_aug``). Evaluation is sequential, split over the
    ranks only with ``dist_eval`` (each rank otherwise evaluates everything).
    """
    distributed = dist.is_available() and dist.is_initialized()
    if is_train:
        if repeated_aug:
            return RASampler(dataset, shuffle=True, seed=seed)
        return DistributedSampler(dataset, shuffle=True, seed=seed) if distributed else RandomSampler(dataset)
    if distributed and dist_eval:
        return DistributedSampler(dataset, shuffle=False)
    return SequentialSampler(dataset)
