"""Directory runs sharded over ``torchrun`` processes: one part of the sorted image list per process.

``torchrun --nproc_per_node=G [--nnodes=N ...] inference_artist.py ...`` (and ``tools/build_gallery.py``) starts
one process per device. The main process (rank 0) starts the run's work folder (:mod:`artifacts.work_folder`) with
one part per process (:func:`artifacts.work_folder.shard_ranges`), every process runs its own part on its own
device (``cuda:LOCAL_RANK``, or the CPU with the gloo backend and its share of the cores), and the main process waits
until every part is complete on disk, then assembles the outputs a one-process run writes. The work folder must be
on a file system every process sees (one machine, or a shared one).

Failures: a process that stops (an error, Ctrl-C, or SIGTERM, which torchrun sends the others when one dies) commits
the batches it finished and says which shard it ran; the main process, waiting, fails with one line naming a shard
whose progress stopped for :data:`STALL_SECONDS`. The same command with ``--resume`` continues every shard where it
stopped (each process its own part; one process continues all of them).

A one-process run joins no process group and imports no torch here (a cached ONNX run starts without PyTorch).
"""

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from artifacts.work_folder import RUN_FILE, Part, WorkFolder
from data.scan import usable_cpus
from errors import UserError

if TYPE_CHECKING:
    from utils import DistEnv

STALL_SECONDS = 600.0  # the main process gives up on a shard whose progress stood still this long
POLL_SECONDS = 0.5
T = TypeVar("T")


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the part writer commits what it finished, as on Ctrl-C


class Shards:
    """This process's place in a (possibly) sharded run; a one-process run is one shard of everything."""

    def __init__(self, dist: "DistEnv | None" = None, device: Any = None):
        self.dist = dist  # None: one process, no process group
        self._device = device

    @classmethod
    def join(cls, device_name: str | None) -> "Shards":
        """Join the ``torchrun`` process group (when there is one) on this process's device (``--device``)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(None, device_name)  # the device is resolved by what runs the model
        import torch

        from utils import init_distributed

        dist = init_distributed(device_name)
        signal.signal(signal.SIGTERM, _stop)
        if dist.device.type == "cpu":  # torchrun sets one thread per process; use this process's share
            local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
            torch.set_num_threads(max(1, usable_cpus() // local))
        return cls(dist)

    @property
    def device(self) -> Any:
        """This process's device: ``cuda:LOCAL_RANK`` (or the CPU) under torchrun, else ``--device`` as given (None:
        CUDA when available)."""
        return self.dist.device if self.dist is not None else self._device

    def main_first(self, load: Callable[[], T]) -> T:
        """``load()`` in the main process first, then in the others (a model's engine cache is filled once)."""
        if self.is_main:
            result = load()
        if self.distributed:
            self.dist.barrier()
        return result if self.is_main else load()

    @property
    def distributed(self) -> bool:
        return self.dist is not None and self.dist.distributed

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    def start(self, path: os.PathLike, identity: dict[str, Any], count: int, batch_size: int, resume: bool,
              notes: dict[str, Any] | None = None) -> WorkFolder:
        """The run's work folder: started (or continued) by the main process, its shards cut at multiples of
        ``batch_size`` (the batches of a one-process run, so the outputs are the same to the bit), then opened by
        the others."""
        if self.is_main:
            work = WorkFolder.start(path, identity, count, resume, notes, self.world_size, batch_size)
        try:
            if self.distributed:
                self.dist.barrier()
        except RuntimeError as err:  # another process stopped: its own error says why
            raise UserError(f"rank {self.dist.rank}: the other processes stopped before the run started ({err}); see "
                            "the first error of the run") from None
        if self.is_main:
            return work
        if not (Path(path) / RUN_FILE).is_file():
            raise UserError(f"rank {self.dist.rank} does not see the work folder {path} that rank 0 started; write the "
                            "output to a file system that every machine of the run shares")
        try:
            return WorkFolder.join(path, identity)
        except UserError as err:
            raise UserError(f"rank {self.dist.rank}: {err}") from None

    def mine(self, work: WorkFolder) -> list[Part]:
        """The unfinished parts this process runs: its own in a sharded run, all of them in one process."""
        parts = [work.parts[self.dist.rank]] if self.distributed else work.parts
        return [part for part in parts if not part.complete]

    @contextlib.contextmanager
    def running(self, work: WorkFolder) -> Iterator[None]:
        """Errors and interruptions of this process's parts as one line (naming its shard in a sharded run)."""
        part = work.parts[self.dist.rank] if self.distributed else None
        try:
            yield
        except UserError as err:
            if part is None:
                raise
            raise UserError(f"{shard_name(work, part)}: {err}") from None
        except KeyboardInterrupt:
            done = (f"{shard_name(work, part)} interrupted with {part.progress.done} of its {part.size}" if part
                    else f"interrupted with {work.done} of {work.record['count']}")
            print(f"{done} images done: the same command with --resume continues", file=sys.stderr, flush=True)
            raise

    def gather(self, work: WorkFolder) -> bool:
        """Whether this process assembles the outputs: the main process, once every part is complete (it waits for
        them); False on the others, which are done."""
        if not self.distributed:
            return True
        if self.is_main:
            wait_for_parts(work)
        return self.is_main

    def close(self) -> None:
        """Leave the process group."""
        if self.distributed:
            from utils import cleanup_distributed

            cleanup_distributed()


def shard_name(work: WorkFolder, part: Part) -> str:
    """``shard 1 of 2 (images 5-9 of 10)``: a part of a sharded run, numbered as the ranks that run them."""
    return (f"shard {work.parts.index(part)} of {len(work.parts)} (images {part.start}-{part.stop - 1} of "
            f"{work.record['count']})")


def wait_for_parts(work: WorkFolder, stall: float = STALL_SECONDS, poll: float = POLL_SECONDS) -> None:
    """Wait until every part of ``work`` is complete on disk (written by other processes); a part whose progress
    stands still for ``stall`` seconds is a UserError naming its shard."""
    moved = {part.folder: (part.progress.done, time.monotonic()) for part in work.parts}  # last change seen
    waiting = work.parts
    try:
        while waiting:
            for part in waiting:
                part.reload()
                done, since = moved[part.folder]
                if part.progress.done != done:
                    moved[part.folder] = (part.progress.done, time.monotonic())
                elif not part.complete and time.monotonic() - since >= stall:
                    raise UserError(f"{shard_name(work, part)} made no progress in {stall:.0f} s ({done} of its "
                                    f"{part.size} images done): its process stopped or hangs; the results so far are "
                                    f"kept in {work.path}: the same command with --resume continues")
            waiting = [part for part in waiting if not part.complete]
            if waiting:
                time.sleep(poll)
    except KeyboardInterrupt:  # torchrun stops the others when a process dies
        unfinished = ", ".join(f"{shard_name(work, part)} with {part.progress.done} done" for part in waiting)
        print(f"stopped while waiting for {unfinished}: the same command with --resume continues", file=sys.stderr,
              flush=True)
        raise
