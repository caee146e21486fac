"""Shared helpers: user-facing errors, checkpoint I/O, BN fusion, distributed set-up and logging."""

import argparse
import datetime
import os
import pickle
import random
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class UserError(Exception):
    """A problem the user can fix: printed as one line (what is wrong, what to do), exit code 2, no traceback."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main`` and turn :class:`UserError` (and Ctrl-C) into a one-line message and exit code."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# --------------------------------------------------------------------------------------------- checkpoints


CHECKPOINT_FILE = "checkpoint.pth"  # the latest full training state
BEST_FILE = "model_best.pth"  # the best weights; published model folders call it best_checkpoint.pth
MODEL_FOLDER_FILES = (BEST_FILE, "best_checkpoint.pth", CHECKPOINT_FILE)
HEAD_PREFIXES = ("head.", "head_dist.")
PROJECTION_PREFIX = "projection."


@dataclass
class Checkpoint:
    """A checkpoint file read safely: its bare ``state_dict`` and everything else it stored (``extra``)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        """Classes of the checkpoint's head, or None when it has no head."""
        weight = self.state_dict.get("head.l.weight")
        return None if weight is None else int(weight.shape[0])

    @property
    def feature_dim(self) -> int | None:
        """Size of the feature vector the head sits on (the projection's output when there is one)."""
        weight = self.state_dict.get("projection.0.l.weight")
        if weight is not None:
            return int(weight.shape[0])
        weight = self.state_dict.get("head.l.weight")
        return None if weight is None else int(weight.shape[1])

    @property
    def distillation(self) -> bool:
        return "head_dist.l.weight" in self.state_dict

    @property
    def args(self) -> dict[str, Any]:
        """Training arguments stored with the checkpoint (old checkpoints store an argparse.Namespace)."""
        args = self.extra.get("args") or {}
        return vars(args) if isinstance(args, argparse.Namespace) else dict(args)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw dict stored in a checkpoint file, read without executing code (``weights_only=True``).

    Use :func:`read_checkpoint` for the weights; this is for training state (optimizer, scheduler, EMA...).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path (a .pth file or a model folder)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds pickled objects other than weights and was not loaded (it could run code); "
            f"re-save it as a plain state_dict ({str(err).splitlines()[0][:120]})"
        ) from None
    except Exception as err:  # torch.load raises many types (KeyError, RuntimeError, EOFError...) on a non-checkpoint
        detail = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} does not contain a state_dict (found {type(obj).__name__})")
    return obj


def checkpoint_from_dict(obj: dict[str, Any], path: str | os.PathLike, prefer_ema: bool = False) -> Checkpoint:
    """A :class:`Checkpoint` from the dict of :func:`load_checkpoint_file` (see :func:`read_checkpoint`)."""
    from model import checkpoint_filter_fn

    path = Path(path)
    state_dict = checkpoint_filter_fn(obj, prefer_ema=prefer_ema)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no model weights (keys: {', '.join(list(obj)[:8])})")
    extra = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor) and k not in ("model", "model_ema")}
    return Checkpoint(path=path, state_dict=tensors, extra=extra)


def find_checkpoint(path: str | os.PathLike, names: Sequence[str] = MODEL_FOLDER_FILES) -> Path:
    """``path`` itself when it is a file, else the first of ``names`` inside the folder ``path``."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in names if (path / name).is_file()), None)
        if found is None:
            raise UserError(f"{path} is a folder without a checkpoint; expected one of {', '.join(names)}, "
                            "or pass the checkpoint file itself")
        return found
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path (a .pth file or a model folder)")
    return path


def read_checkpoint(path: str | os.PathLike, prefer_ema: bool = False) -> Checkpoint:
    """Read a checkpoint file without executing code (``weights_only=True``; argparse.Namespace allowed).

    Accepts a bare state_dict or a dict holding it under ``model``, ``model_ema`` or ``state_dict``
    (``prefer_ema`` picks the EMA weights when both are stored); strips ``module.``/``_orig_mod.`` prefixes.
    """
    return checkpoint_from_dict(load_checkpoint_file(path), path, prefer_ema=prefer_ema)


def guess_architecture(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name the registered LSNet backbone whose embed dims and depths match these weights, if any."""
    from model.lsnet import MODEL_ARGS
    from model.lsnet_artist import ARTIST_MODEL_ARGS

    stem = state_dict.get("patch_embed.4.c.weight")
    if stem is None:
        return None
    modules_per_stage = [len({k.split(".")[1] for k in state_dict if k.startswith(f"blocks{stage}.")})
                         for stage in range(1, 5)]
    for name, cfg in {**ARTIST_MODEL_ARGS, **MODEL_ARGS}.items():
        # Stages 2-4 start with two downsampling modules before their blocks.
        expected = [depth + (2 if stage else 0) for stage, depth in enumerate(cfg["depth"])]
        if expected == modules_per_stage and stem.shape[0] == cfg["embed_dim"][0]:
            return name
    return None


def _describe_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 3) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}"
              for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {'; '.join(items[:limit])})")
    return ", ".join(parts)


def load_checkpoint(
    source: str | os.PathLike | Checkpoint,
    model: nn.Module,
    *,
    reset_heads_on_mismatch: bool = False,
    backbone_only: bool = False,
    prefer_ema: bool = False,
    log: Callable[[str], None] = print,
) -> Checkpoint:
    """Load a checkpoint into ``model`` (the one checkpoint loader every script uses) and return it.

    All keys must match (strict). ``reset_heads_on_mismatch`` keeps the model's fresh heads when the
    checkpoint's class count differs (printing a message); ``backbone_only`` loads everything but the heads
    and projection (e.g. an official ImageNet checkpoint as initialisation). Any other difference is a
    :class:`UserError` that lists what differs and, when recognisable, which architecture the weights are.
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source, prefer_ema=prefer_ema)
    state_dict = dict(ckpt.state_dict)
    own = model.state_dict()
    skip_prefixes: tuple[str, ...] = ()
    if backbone_only:
        skip_prefixes = HEAD_PREFIXES + (PROJECTION_PREFIX,)
    elif reset_heads_on_mismatch and any(
        k.startswith(HEAD_PREFIXES) and (k not in own or own[k].shape != v.shape) for k, v in state_dict.items()
    ):
        log(f"{ckpt.path.name}: head has {ckpt.num_classes} classes, model has "
            f"{getattr(model, 'num_classes', '?')}: the classifier heads are re-initialised")
        skip_prefixes = HEAD_PREFIXES
    if skip_prefixes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip_prefixes)}
        for k, v in own.items():
            if k.startswith(skip_prefixes):
                state_dict[k] = v
    problem = _describe_mismatch(model, state_dict)
    if problem:
        arch = guess_architecture(ckpt.state_dict)
        hint = f"the weights look like {arch}: pass --model {arch}" if arch else "pass the --model it was trained with"
        raise UserError(f"{ckpt.path} does not fit {type(model).__name__} "
                        f"{getattr(model, 'pretrained_cfg', {}).get('architecture', '')}: {problem}; {hint}")
    model.load_state_dict(state_dict, strict=True)
    return ckpt


def save_checkpoint_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a truncated file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- inference


def replace_batchnorm(net: nn.Module) -> nn.Module:
    """Fuse Conv-BN, BN-Linear and RepVGGDW branches in place for inference (call on an eval-mode model).

    timm's ``reparameterize_model`` (what ``LSNet.fuse()`` runs). Unlike the original helper, a BatchNorm that
    cannot be folded into a neighbour (after SKA) is kept, so fused and unfused models give the same outputs.
    """
    from timm.utils import reparameterize_model

    return reparameterize_model(net, inplace=True)


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


def init_distributed_mode(args: argparse.Namespace) -> torch.device:
    """Join the process group when started by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment).

    Sets ``args.distributed``, ``args.rank``, ``args.world_size`` and ``args.gpu`` (the local rank), and returns
    this process's device: ``cuda:LOCAL_RANK`` with the nccl backend on CUDA, the gloo backend on CPU (and on
    Windows, which has no nccl).
    """
    device = resolve_device(args.device)
    args.rank = int(os.environ.get("RANK", 0))
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    if not args.distributed:
        return device
    if device.type == "cuda":
        if args.gpu >= torch.cuda.device_count():
            raise UserError(f"local rank {args.gpu} has no GPU ({torch.cuda.device_count()} visible); start at "
                            "most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", args.gpu)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" and torch.distributed.is_nccl_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, init_method="env://", world_size=args.world_size,
                                         rank=args.rank)
    if args.rank == 0:
        print(f"distributed: {args.world_size} processes, backend {backend}", flush=True)
    return device


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


def save_on_master(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """:func:`save_checkpoint_atomic` on the main process only."""
    if is_main_process():
        save_checkpoint_atomic(obj, path)


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
