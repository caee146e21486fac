"""The training run folder: the one module that writes and reads what a training run leaves in ``--output-dir``.

``checkpoint.pth`` (full training state), ``model_best.pth`` (best weights + what inference needs),
``checkpoint_epochN.pth`` (``--save-every``), ``args.json`` (the run's settings), ``class_mapping.csv`` (via
:mod:`data.class_mapping`), ``config.json`` (via :mod:`artifacts.model_folder`), ``train_log.txt`` (one JSON record
per epoch) and ``tensorboard/``. Checkpoint dicts are assembled by :func:`training_checkpoint` and read back for
resume by :func:`read_resume_point` and for ``--eval`` by :func:`read_eval_weights`.
"""

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from artifacts.checkpoint import (
    Checkpoint,
    checkpoint_from_dict,
    load_checkpoint_file,
    save_checkpoint_atomic,
    write_error,
)
from artifacts.config_file import write_config, write_json_atomic
from artifacts.model_source import BEST_FILE, CHECKPOINT_FILE
from data.class_mapping import CLASS_MAPPING_FILE, compare_class_mappings, read_class_mapping, write_class_mapping
from utils import UserError

__all__ = ["ARGS_FILE", "LOG_FILE", "SCHEDULE_ARGS", "TENSORBOARD_DIR", "Best", "ResumePoint", "RunFolder",
           "args_record", "best_checkpoint", "checkpoint_sizes", "epoch_checkpoint_name", "json_safe",
           "read_eval_weights", "read_log_records", "read_resume_point", "tensorboard_tag", "training_checkpoint"]

LOG_FILE = "train_log.txt"
ARGS_FILE = "args.json"
TENSORBOARD_DIR = "tensorboard"
# Settings that define the learning-rate schedule: when one changed since the checkpoint, resume follows the new one.
SCHEDULE_ARGS = ("sched", "epochs", "scaled_lr", "min_lr", "warmup_lr", "warmup_epochs", "cooldown_epochs",
                 "decay_epochs", "decay_rate", "lr_noise", "lr_noise_pct", "lr_noise_std", "seed")
# Keys of model_best.pth besides the weights.
_BEST_KEYS = ("epoch", "best_metric", "best_key", "args", "class_names", "config")


@dataclass(frozen=True)
class Best:
    """The best validation result so far: the metric's value, which weights (``model``/``model_ema``), which epoch."""

    metric: float = -math.inf
    source: str | None = None
    epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "source": self.source, "epoch": self.epoch}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, Infinity) replaced by None: strict JSON writes it as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """A JSON / ``weights_only`` friendly copy of a setting's value (a non-finite float becomes None)."""
    if isinstance(value, float):
        return json_safe(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def args_record(flags: Mapping[str, Any], **runtime: Any) -> dict[str, Any]:
    """``args.json`` and a checkpoint's ``args``: every flag's value plus run facts (world_size, scaled_lr...)."""
    return {key: _plain(value) for key, value in {**flags, **runtime}.items()}


def training_checkpoint(*, model: dict, optimizer: dict, lr_scheduler: dict, scaler: dict | None, epoch: int,
                        best: Best, best_key: str, args: dict[str, Any], class_names: Sequence[str],
                        config: dict[str, Any], rng_states: list, model_ema: dict | None) -> dict[str, Any]:
    """The ``checkpoint.pth`` dict (0-based ``epoch``; state_dicts of the model, optimizer, scheduler, scaler, EMA)."""
    state = {
        "model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "scaler": scaler, "epoch": epoch,
        "best_metric": best.metric, "best_key": best_key, "best_source": best.source, "best_epoch": best.epoch,
        "args": args, "class_names": list(class_names), "config": config, "rng_states": rng_states,
    }
    if model_ema is not None:
        state["model_ema"] = model_ema
    return state


def best_checkpoint(state: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``model_best.pth`` dict: the ``source`` weights (``model`` or ``model_ema``) of a training checkpoint."""
    return {"model": state[source], **{key: state[key] for key in _BEST_KEYS}, "best_source": source}


def epoch_checkpoint_name(epoch: int) -> str:
    """``checkpoint_epochN.pth`` for 1-based epoch N."""
    return f"checkpoint_epoch{epoch}.pth"


def _newest_loadable(folder: Path) -> tuple[Path, dict[str, Any], str]:
    """The newest loadable training checkpoint of a run folder (``checkpoint.pth``, else the highest
    ``checkpoint_epochN.pth``), its contents, and a note saying why another one was passed over ("" when none was)."""
    numbered = sorted((int(match.group(1)), path) for path in folder.glob("checkpoint_epoch*.pth")
                      if (match := re.fullmatch(r"checkpoint_epoch(\d+)\.pth", path.name)))
    candidates = [folder / CHECKPOINT_FILE] + [path for _, path in reversed(numbered)]
    passed_over = []
    for path in candidates:
        if not path.is_file():
            passed_over.append(f"{path.name} is missing")
            continue
        try:
            return path, load_checkpoint_file(path), "; ".join(passed_over)
        except UserError as err:
            passed_over.append(str(err))
    raise UserError(f"{folder} holds no loadable training checkpoint ({'; '.join(passed_over)}); pass the run's "
                    "--output-dir, or start a new run without --resume")


def checkpoint_sizes(model: nn.Module, ema: bool, optimizer_slots: int = 2) -> tuple[int, int]:
    """Estimated bytes of ``checkpoint.pth`` and ``model_best.pth`` of ``model``: its weights, ``optimizer_slots``
    tensors per trainable parameter (AdamW keeps 2), the EMA copy, plus 1% and 1 MB for everything else."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    full = weights * (2 if ema else 1) + trainable * optimizer_slots
    return int(full * 1.01) + 2**20, int(weights * 1.01) + 2**20


def _checkpoint_classes(raw: dict[str, Any], path: Path) -> list[str] | None:
    """Class names stored in a checkpoint, else those of the ``class_mapping.csv`` next to it."""
    if raw.get("class_names"):
        return list(raw["class_names"])
    mapping = path.parent / CLASS_MAPPING_FILE
    return read_class_mapping(mapping) if mapping.is_file() else None


def _check_classes(raw: dict[str, Any], path: Path, class_names: Sequence[str], action: str) -> None:
    expected = _checkpoint_classes(raw, path)
    if expected is None:
        return
    differences = compare_class_mappings(expected, class_names, expected_label=str(path), actual_label="dataset")
    if differences:
        raise UserError(f"the classes of {path} differ from the dataset's ({'; '.join(differences)}): {action}")


@dataclass(frozen=True)
class ResumePoint:
    """A training checkpoint read back for ``--resume``: its weights and training state by meaning, not by key."""

    path: Path
    raw: dict[str, Any]

    @property
    def epoch(self) -> int:
        """The last finished epoch (0-based)."""
        return int(self.raw["epoch"])

    @property
    def best(self) -> Best:
        return Best(self.raw.get("best_metric", -math.inf), self.raw.get("best_source"), self.raw.get("best_epoch"))

    @property
    def args(self) -> dict[str, Any]:
        return self.weights().args

    @property
    def has_ema(self) -> bool:
        return isinstance(self.raw.get("model_ema"), dict)

    def weights(self, ema: bool = False) -> Checkpoint:
        """The model weights (``ema``: the EMA weights) as a :class:`Checkpoint`."""
        return checkpoint_from_dict(self.raw, self.path, prefer_ema=ema)

    def state(self, name: str) -> Any:
        """``optimizer``, ``lr_scheduler``, ``scaler`` state dict or ``rng_states`` (None when not stored)."""
        return self.raw.get(name)

    def check_classes(self, class_names: Sequence[str]) -> None:
        """Refuse a checkpoint trained on other classes than ``class_names``."""
        _check_classes(self.raw, self.path, class_names, "resume with the dataset it was trained on")


def read_resume_point(path: str | os.PathLike, log: Callable[[str], None] = print) -> ResumePoint:
    """Read the checkpoint to resume, once: a file as given, a folder's newest loadable training checkpoint (said
    through ``log`` when it is not ``checkpoint.pth``); it must hold training state."""
    path = Path(path)
    if path.is_dir():
        found, raw, passed_over = _newest_loadable(path)
        log(f"--resume {path}: continuing from {found}" + (f" ({passed_over})" if passed_over else ""))
        path = found
    else:
        raw = load_checkpoint_file(path)
    missing = [key for key in ("optimizer", "epoch") if key not in raw]
    if missing:
        raise UserError(f"{path} holds no training state ({', '.join(missing)} missing), so it cannot be resumed; "
                        f"start a new run from its weights with --finetune-from {path}")
    return ResumePoint(path, raw)


def read_eval_weights(path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, Checkpoint]:
    """``--eval``: the weight sets of a checkpoint (``model``, and ``model_ema`` when stored), classes checked."""
    point = ResumePoint(Path(path), load_checkpoint_file(path))
    _check_classes(point.raw, point.path, class_names, "evaluate on the dataset it was trained on")
    sources = {"model": point.weights()}
    if point.has_ema:
        sources["model_ema"] = point.weights(ema=True)
    return sources


def append_log_record(folder: Path, record: dict[str, Any]) -> None:
    """Add one epoch's record to ``train_log.txt`` (a strict JSON object per line: NaN / Infinity become null)."""
    try:
        with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    except OSError as err:
        raise write_error(folder / LOG_FILE, err, "the checkpoints of this epoch are saved") from None


def read_log_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch records of a run folder's ``train_log.txt``, oldest first (``[]`` when there is no log)."""
    path = Path(folder) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tensorboard_tag(key: str) -> str:
    """``val_acc1`` -> ``val/acc1``, ``ema_val_loss`` -> ``ema_val/loss``, ``train_loss``/``lr`` -> ``train/...``."""
    for prefix in ("ema_val_", "val_", "train_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


class RunFolder:
    """Writes a run's output folder (the main process only; ``path`` None or ``enabled`` False: writes nothing).

    :meth:`start` prepares it, :meth:`open_tensorboard` starts the event file, :meth:`save_epoch` saves an epoch
    (checkpoints, log record, TensorBoard scalars), :meth:`close` closes TensorBoard. A saver in the spirit of
    timm's ``CheckpointSaver``.
    """

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path and enabled else None
        self.writer: Any = None

    def start(self, class_names: Sequence[str], resuming: bool, args: dict[str, Any], config: dict[str, Any]) -> None:
        """Create the folder, drop stale temporary files, write ``class_mapping.csv``, ``args.json`` and
        ``config.json``; a new run over an old one clears the old log (with a warning)."""
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.pth.*.tmp"):  # left by a process killed while saving
            stale.unlink()
        self._write_class_mapping(class_names, resuming)
        if not resuming and (self.path / CHECKPOINT_FILE).is_file():
            print(f"warning: {self.path} holds a previous run, which this run overwrites (pass --resume "
                  f"{self.path / CHECKPOINT_FILE} to continue it instead)", flush=True)
            (self.path / LOG_FILE).unlink(missing_ok=True)
        write_json_atomic(self.path / ARGS_FILE, args)
        write_config(self.path, config)

    def check_free_space(self, checkpoint_bytes: int, best_bytes: int, snapshots: int = 0) -> None:
        """Stop (one line) when the folder cannot hold one epoch's checkpoints; warn when it holds less than two
        checkpoints' worth (each save writes the new file beside the old one, then replaces it), or less than that
        plus the ``snapshots`` ``checkpoint_epochN.pth`` files ``--save-every`` will keep."""
        if self.path is None:
            return
        free = shutil.disk_usage(self.path).free
        existing = sum(f.stat().st_size for f in (self.path / CHECKPOINT_FILE, self.path / BEST_FILE) if f.is_file())
        once = checkpoint_bytes + best_bytes
        steady = 2 * once - existing
        if free < once:
            raise UserError(f"{self.path} has {_mb(free)} free, but saving an epoch needs about {_mb(once)} "
                            f"({CHECKPOINT_FILE} {_mb(checkpoint_bytes)} + {BEST_FILE} {_mb(best_bytes)}): free some "
                            "space or choose another --output-dir")
        if free < steady:
            print(f"warning: {self.path} has {_mb(free)} free, less than the {_mb(steady)} that two checkpoints need "
                  "(a save writes the new file before replacing the old one): a later save may fail, keeping the "
                  "previous checkpoint", flush=True)
        elif free < steady + snapshots * checkpoint_bytes:
            print(f"warning: {self.path} has {_mb(free)} free, but the {snapshots} checkpoint_epochN.pth files that "
                  f"--save-every keeps need {_mb(snapshots * checkpoint_bytes)} more: later snapshots may fail; "
                  "raise --save-every or free some space", flush=True)

    def _write_class_mapping(self, class_names: Sequence[str], resuming: bool) -> None:
        path = self.path / CLASS_MAPPING_FILE
        if path.is_file():
            differences = compare_class_mappings(read_class_mapping(path), class_names, expected_label=str(path),
                                                 actual_label="dataset")
            if differences and resuming:
                raise UserError(f"{path} differs from the dataset's classes ({'; '.join(differences)}): resuming "
                                "onto other classes would corrupt the classifier; use the original dataset, or start "
                                "a new run in another --output-dir (--finetune-from the checkpoint)")
            if differences:
                print(f"warning: {path} differs from the dataset and is replaced: " + "; ".join(differences),
                      flush=True)
        write_class_mapping(path, class_names)

    def save_epoch(self, state: dict[str, Any], record: dict[str, Any], improved: str | None,
                   save_every: int) -> None:
        """Write the epoch's checkpoints (``model_best.pth`` first, ``checkpoint.pth`` last), log record and
        scalars; ``improved``: the weights (``model``/``model_ema``) that set a new best, if any."""
        if self.path is None:
            return
        done = record["epoch"]
        if improved:
            save_checkpoint_atomic(best_checkpoint(state, improved), self.path / BEST_FILE)
        if save_every and done % save_every == 0:
            save_checkpoint_atomic(state, self.path / epoch_checkpoint_name(done))
        save_checkpoint_atomic(state, self.path / CHECKPOINT_FILE)
        append_log_record(self.path, record)
        self._log_scalars(record)

    def open_tensorboard(self) -> None:
        """Start the TensorBoard event file in ``tensorboard/`` (before the first epoch)."""
        if self.path is not None and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.path / TENSORBOARD_DIR))

    def _log_scalars(self, record: dict[str, Any]) -> None:
        self.open_tensorboard()
        for key, value in record.items():
            if key not in ("epoch", "time"):
                self.writer.add_scalar(tensorboard_tag(key), value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
