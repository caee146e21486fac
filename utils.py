"""Shared helpers (no project imports but :mod:`errors`): user-facing errors, devices, distributed set-up, random
state, progress."""

import datetime
import os
import random
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# defined without torch (a cached ONNX run imports errors, not utils); re-exported for the scripts
from errors import NumberRange as NumberRange
from errors import UserError
from errors import run_cli as run_cli

# --------------------------------------------------------------------------------------------- flags


def spreadsheet_safe(text: str) -> str:
    """``text`` for a CSV cell that people open in a spreadsheet: a leading ``= + - @`` (or tab / CR) gets a ``'``
    in front, so it is shown as text and never run as a formula. Machine-read files keep exact names."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# --------------------------------------------------------------------------------------------- inference


# --------------------------------------------------------------------------------------------- devices, distributed


def compile_for_inference(net: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` an eval-mode (fused) model for inference with Inductor's ``freezing``: weights become
    constants, folded into the graph and, on the CPU, pre-packed for oneDNN with ReLUs and additions fused into
    the convolutions. Run it under ``torch.inference_mode()``; the first call of each batch shape compiles (tens
    of seconds on a small CPU) and Inductor needs a C++ compiler on the CPU."""
    return torch.compile(net, dynamic=False, options={"freezing": True})


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``--device``: the named device (default: CUDA when available, else CPU); a missing GPU is a UserError."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but no CUDA GPU is usable (torch.cuda.is_available() is False); "
                            "use --device cpu, or install a CUDA build of torch and a driver")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name} but only {torch.cuda.device_count()} GPU(s) are visible; "
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` run: rank, process count, local rank (its GPU) and device."""

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
    device = resolve_device(device_name)
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


def cleanup_distributed() -> None:
    """Leave the process group (if any), so processes exit cleanly."""
    if is_dist_avail_and_initialized():
        torch.distributed.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return torch.distributed.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def print_main(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only (flushed, so logs of several processes stay in order)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (the tensor itself when not distributed); reduces in place."""
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# --------------------------------------------------------------------------------------------- random state


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states as tensors and ints (``weights_only`` safe)."""
    version, mt_state, gauss_next = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(mt_state, dtype=torch.int64), "python_version": version, "python_gauss": gauss_next,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state from :func:`get_rng_state`."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------- progress


class SmoothedValue:
    """A scalar series: mean over the last ``window`` values and over everything."""

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


class Progress:
    """Per-step progress on the main process: loss, lr, throughput (img/s) and ETA.

    A tqdm bar on a terminal; otherwise (logs, pipes) a plain line every ``print_freq`` steps and at the last step.
    Other processes show nothing.
    """

    def __init__(self, total: int, desc: str, print_freq: int = 50, enabled: bool | None = None):
        self.total, self.desc, self.print_freq = total, desc, max(print_freq, 1)
        self.enabled = is_main_process() if enabled is None else enabled
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.lr: float | None = None
        self.images = self.step = 0
        self.start = time.perf_counter()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, images: int, lr: float | None = None, **values: float) -> None:
        """Record one step: ``images`` processed (by all processes), the current lr and scalar values (loss...)."""
        self.step += 1
        self.images += images
        self.lr = lr if lr is not None else self.lr
        for name, value in values.items():
            self.meters[name].update(value, images)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.step % max(self.total // 200, 1) == 0 or self.step == self.total:
                self.bar.set_postfix_str(self._summary(), refresh=False)
        elif self.step % self.print_freq == 0 or self.step == self.total or self.step == 1:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.step * (self.total - self.step)
            width = len(str(self.total))
            print(f"{self.desc} [{self.step:>{width}}/{self.total}] {self._summary()} "
                  f"eta {datetime.timedelta(seconds=int(eta))}", flush=True)

    def _summary(self) -> str:
        parts = [f"{name} {meter.avg:.4f}" for name, meter in self.meters.items()]
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3e}")
        parts.append(f"{self.throughput:.1f} img/s")
        return " ".join(parts)

    @property
    def throughput(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
