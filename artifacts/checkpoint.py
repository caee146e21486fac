"""The checkpoint file format: reading weights safely, loading them strictly into a model, saving atomically.

Training (``checkpoint.pth``, ``model_best.pth``), the original artist scripts, community model folders
(``best_checkpoint.pth``) and the official LSNet releases all store a dict holding a state_dict under ``model``,
``model_ema`` or ``state_dict`` (or a bare state_dict). This module is the one place that reads such files; which
other keys a training checkpoint holds is :mod:`artifacts.run_folder`'s business.
"""

import argparse
import errno
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from artifacts.model_source import find_checkpoint
from model import checkpoint_filter_fn
from model.lsnet import CLASSIFIER_PREFIXES, HEAD_PREFIXES, MODEL_ARGS
from model.lsnet_artist import ARTIST_MODEL_ARGS
from utils import UserError


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
    if path.suffix == ".safetensors":
        return {"model": _read_safetensors(path)}
    _check_checkpoint_format(path)
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


def _check_checkpoint_format(path: Path) -> None:
    """Refuse a file that is neither a ``torch.save`` zip archive nor a (legacy) pickle: an image, a text..."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}; check its permissions") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"{path} is not a checkpoint (not a PyTorch .pth file); pass a checkpoint saved by training "
                        "(model_best.pth, checkpoint.pth) or its model folder")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (weights only, nothing executable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({str(err)[:120]})") from None


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` as a ``.safetensors`` file (contiguous copies; written next to ``path``, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, tmp)
    tmp.replace(path)


def checkpoint_from_dict(obj: dict[str, Any], path: str | os.PathLike, prefer_ema: bool = False) -> Checkpoint:
    """A :class:`Checkpoint` from the dict of :func:`load_checkpoint_file` (see :func:`read_checkpoint`)."""
    path = Path(path)
    state_dict = checkpoint_filter_fn(obj, prefer_ema=prefer_ema)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no model weights (keys: {', '.join(list(obj)[:8])})")
    extra = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor) and k not in ("model", "model_ema")}
    return Checkpoint(path=path, state_dict=tensors, extra=extra)


def read_checkpoint(path: str | os.PathLike, prefer_ema: bool = False) -> Checkpoint:
    """Read a checkpoint file without executing code (``weights_only=True``; argparse.Namespace allowed).

    Accepts a bare state_dict or a dict holding it under ``model``, ``model_ema`` or ``state_dict``
    (``prefer_ema`` picks the EMA weights when both are stored); strips ``module.``/``_orig_mod.`` prefixes.
    ``path`` may also be a model folder (or an ``hf-hub:`` id of one), e.g. a ``model.safetensors`` folder.
    """
    path = find_checkpoint(path)
    return checkpoint_from_dict(load_checkpoint_file(path), path, prefer_ema=prefer_ema)


def guess_architecture(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name the registered LSNet backbone whose embed dims and depths match these weights, if any."""
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
        skip_prefixes = HEAD_PREFIXES
    elif reset_heads_on_mismatch and any(
        k.startswith(CLASSIFIER_PREFIXES) and (k not in own or own[k].shape != v.shape) for k, v in state_dict.items()
    ):
        log(f"{ckpt.path.name}: head has {ckpt.num_classes} classes, model has "
            f"{getattr(model, 'num_classes', '?')}: the classifier heads are re-initialised")
        skip_prefixes = CLASSIFIER_PREFIXES
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


# Write errors that a user fixes (full disk, quota, permissions, read-only filesystem): reported in one line.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(path: str | os.PathLike, err: OSError, kept: str = "") -> UserError:
    """The one-line error for a failed write of ``path`` (``kept``: what is still intact, e.g. the previous file)."""
    reason = (err.strerror or os.strerror(err.errno)) if err.errno else str(err)
    hint = "free some space or choose another --output-dir" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "check that the folder is writable or choose another --output-dir"
    return UserError(f"cannot write {path}: {reason}; {hint}" + (f" ({kept})" if kept else ""))


class _RecordingFile:
    """A binary file whose failed writes are remembered: ``torch.save`` turns them into a RuntimeError."""

    def __init__(self, fh: Any):
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_checkpoint_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a truncated file. A full disk or
    an unwritable folder is a one-line :class:`UserError` naming ``path``; the previous file is kept.
    """
    path = Path(path)
    kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            recording = _RecordingFile(fh)
            try:
                torch.save(obj, recording)
            except RuntimeError:
                if recording.error is None:
                    raise
                raise recording.error from None
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            raise write_error(path, err, kept) from None
        raise
