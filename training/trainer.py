"""The training job: :func:`fit` trains (or with ``--eval`` evaluates) a model as the configuration says.

A training script builds its datasets, model and :class:`Task` (loss, validation metric, the metric that selects
``model_best.pth``); everything else (output folder, checkpoints and resume, EMA, AMP, accumulation, distributed
training, logging) happens here.
"""

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3, NativeScaler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import utils
from artifacts.model_folder import build_config
from artifacts.run_folder import (
    Best,
    ResumePoint,
    RunFolder,
    args_record,
    checkpoint_sizes,
    read_log_records,
    training_checkpoint,
)
from training.config import TrainConfig
from training.distributed import DistEnv
from training.early_stopping import EarlyStopping
from training.factory import build_optimizer, build_scheduler, scale_lr
from training.guard import DivergenceGuard
from training.loaders import Loaders, build_loaders
from training.loops import evaluate, train_one_epoch
from training.metrics import Metric, TopKAccuracy
from training.report import best_summary, write_run_report
from training.resume import TrainingState, epoch_seed, evaluate_checkpoint, load_resume_weights, seed_streams
from utils import UserError

__all__ = ["Task", "Trainer", "amp_dtype", "check_finite_weights", "fit", "grad_scaler", "memory_format",
           "wrap_model"]


@dataclass
class Task:
    """What differs between training scripts.

    ``criterion``: training loss (see :func:`~training.loops.train_one_epoch`); ``eval_criterion``: validation loss
    (default CE); ``metric_factory``: a fresh :class:`Metric` per validation; ``best_key``: its value (higher is
    better) that selects ``model_best.pth``; ``extra_config``: additional ``config.json`` entries.
    """

    criterion: nn.Module
    mixup_fn: Callable | None = None
    eval_criterion: nn.Module | None = None
    metric_factory: Callable[[], Metric] = TopKAccuracy
    best_key: str = "acc1"
    extra_config: dict[str, Any] | None = None


def fit(cfg: TrainConfig, dist: DistEnv, model: nn.Module, dataset_train: Dataset | None, dataset_val: Dataset,
        class_names: Sequence[str], task: Task, resume: ResumePoint | None = None) -> dict[str, Any]:
    """Train (``--eval``: only evaluate) ``model``, writing the run folder; ``resume``: the checkpoint to continue
    (:func:`~training.resume.open_resume`).

    Returns ``--eval``: the metrics per weight set; otherwise the last epoch's log record plus the ``best`` result.
    """
    run = cfg.run
    loaders = build_loaders(None if run.eval_only else dataset_train, dataset_val, dist,
                            batch_size=cfg.optim.batch_size, num_workers=run.num_workers, seed=run.seed,
                            repeated_aug=cfg.augment.repeated_aug, pin_memory=run.pin_mem, dist_eval=run.dist_eval,
                            sampler=cfg.sampler)
    model.to(dist.device, memory_format=memory_format(run.channels_last))
    task.criterion.to(dist.device)
    if run.eval_only:
        validate = functools.partial(_validate, cfg, dist, loaders, task)
        return evaluate_checkpoint(run.resume, model, list(class_names), validate, task.metric_factory, dist.device)
    return Trainer(cfg, dist, model, loaders, list(class_names), task, resume).run()


def memory_format(channels_last: bool) -> torch.memory_format:
    """``--channels-last``: the memory format of the model's weights and input batches."""
    return torch.channels_last if channels_last else torch.preserve_format


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """``--amp``: float16 on CUDA, bfloat16 elsewhere; None when off."""
    return (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None


def grad_scaler(amp: bool, device: torch.device) -> NativeScaler | None:
    """``--amp`` on CUDA (float16): the loss scaler; None otherwise (bfloat16 needs none)."""
    return NativeScaler(device="cuda") if amp and device.type == "cuda" else None


def wrap_model(model: nn.Module, dist: DistEnv, compile_model: bool = False) -> nn.Module:
    """DistributedDataParallel under torchrun (frozen parameters are not synchronised), ``torch.compile`` with
    ``--compile``."""
    if dist.distributed:
        device = dist.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def _validate(cfg: TrainConfig, dist: DistEnv, loaders: Loaders, task: Task, model: nn.Module, metric: Metric,
              header: str = "Val") -> dict[str, float]:
    eval_criterion = task.eval_criterion if task.eval_criterion is not None else nn.CrossEntropyLoss()
    try:
        return evaluate(model, loaders.val, dist.device, eval_criterion, metric,
                        amp_dtype=amp_dtype(cfg.run.amp, dist.device),
                        distributed=dist.distributed and cfg.run.dist_eval, print_freq=cfg.run.print_freq,
                        header=header, memory_format=memory_format(cfg.run.channels_last))
    except MemoryError as err:  # numpy's: one line, and the epochs saved so far stay
        raise UserError(f"validation ran out of memory ({err}); the checkpoints saved so far are kept; validate on "
                        "fewer images or with a smaller --batch-size") from None


def build_training_state(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device,
                         criterion: nn.Module | None = None, updates_per_epoch: int = 1) -> TrainingState:
    """Optimizer (also over the criterion's own parameters) and scheduler (timm, stepped per optimizer step), AMP
    scaler (CUDA float16 only) and model EMA, as the configuration says."""
    optimizer = build_optimizer(model, cfg.optim, lr, criterion)
    scaler = grad_scaler(cfg.run.amp, device)
    ema = None
    if cfg.ema.enabled:
        ema = ModelEmaV3(model, decay=cfg.ema.decay, device=torch.device("cpu") if cfg.ema.force_cpu else None)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.seed, updates_per_epoch)
    return TrainingState(optimizer, scheduler, scaler, ema)


def check_finite_weights(model: nn.Module, epoch: int) -> None:
    """Stop (before saving) when an epoch left non-finite weights."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise UserError(f"weights became non-finite in epoch {epoch} ({', '.join(bad[:3])}): training stopped and "
                        "this epoch was not saved; lower --lr or use --clip-grad")


class Trainer:
    """One training run: set up from the configuration (and ``--resume``), then :meth:`run` the epochs."""

    def __init__(self, cfg: TrainConfig, dist: DistEnv, model: nn.Module, loaders: Loaders, class_names: list[str],
                 task: Task, resume: ResumePoint | None = None):
        self.cfg, self.dist, self.model, self.loaders, self.class_names, self.task = (
            cfg, dist, model, loaders, class_names, task)
        self.resume_point = resume
        if resume is not None:
            load_resume_weights(resume, model, class_names)
        scaled_lr = scale_lr(cfg.optim, dist.world_size)
        self.args = args_record(cfg.settings(), num_classes=model.num_classes, rank=dist.rank,
                                world_size=dist.world_size, gpu=dist.local_rank, distributed=dist.distributed,
                                scaled_lr=scaled_lr)
        self.config = build_config(cfg.model.name, model, cfg.model.input_size, squash=cfg.model.finetune,
                                   **(task.extra_config or {}))
        self.folder = RunFolder(cfg.run.output_dir, enabled=dist.is_main)
        self.folder.start(class_names, self.resume_point is not None, self.args, self.config)
        first = self.resume_point.epoch + 1 if self.resume_point is not None else cfg.run.start_epoch
        snapshots = cfg.optim.epochs // cfg.run.save_every - first // cfg.run.save_every if cfg.run.save_every else 0
        self.folder.check_free_space(*checkpoint_sizes(model, cfg.ema.enabled), snapshots=max(snapshots, 0))
        self.guard = DivergenceGuard(cfg.run.output_dir, self.resume_point is not None)
        self.updates_per_epoch = math.ceil(len(loaders.train) / cfg.optim.accumulation_steps)
        self.state = build_training_state(model, cfg, scaled_lr, dist.device, task.criterion,
                                          self.updates_per_epoch)
        self.start_epoch, self.best = cfg.run.start_epoch, Best()
        if self.resume_point is not None:
            self.state.restore(self.resume_point, self.args)
            restore_criterion(task.criterion, self.resume_point.state(CRITERION_KEY), cfg.run.resume)
            self.start_epoch, self.best = self.resume_point.epoch + 1, self.resume_point.best
            utils.print_main(f"resumed from {cfg.run.resume}: continuing at epoch {self.start_epoch + 1}")

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last epoch's record plus ``best`` (a dict)."""
        epochs = self.cfg.optim.epochs
        if self.start_epoch >= epochs:
            utils.print_main(f"{self.start_epoch} of {epochs} epochs are done; raise --epochs to train longer")
            return {"best": self.best.as_dict()}
        if self.start_epoch > 0:
            self.state.scheduler.step(self.start_epoch)
            self.state.scheduler.step_update(self.start_epoch * self.updates_per_epoch)
        net = wrap_model(self.model, self.dist, self.cfg.run.compile)
        seed_streams(self.resume_point, self.dist, self.cfg.run.seed, self.start_epoch)
        self.folder.open_tensorboard()
        utils.print_main(f"training {self.cfg.model.name} on {len(self.loaders.train.dataset)} images, "
                         f"{len(self.class_names)} classes, epochs {self.start_epoch + 1}..{epochs}, "
                         f"{len(self.loaders.train)} steps per epoch")
        record: dict[str, Any] = {}
        history, stopper = [], EarlyStopping(self.cfg.run.patience)
        try:
            for epoch in range(self.start_epoch, epochs):
                record = self.run_epoch(net, epoch)
                history.append(record)
                if stopper.update(record, self.best):
                    utils.print_main(stopper.message(self.best, self.task.best_key))
                    break
        finally:
            self.folder.close()
        self._finish(history)
        return {**record, "best": self.best.as_dict(), "stopped_early": stopper.stopped}

    def _finish(self, history: list[dict[str, Any]]) -> None:
        """Print the best epoch and its metrics; write the training report (main process)."""
        path = self.folder.path
        records = read_log_records(path) if path is not None else history
        summary = best_summary(records, self.best.epoch, self.task.best_key, self.best.source)
        utils.print_main(summary)
        if path is not None:
            write_run_report(path, self.model, records, self.class_names, self.loaders.val.dataset, self.dist.device,
                             best_key=self.task.best_key, summary=summary, batch_size=self.loaders.val.batch_size,
                             multi_label=self.cfg.multilabel is not None, train_counts=self._train_counts())

    def _train_counts(self) -> list[int] | None:
        """Training images per class (single-label datasets with ``targets``), for the report's long-tail view."""
        targets = getattr(self.loaders.train.dataset if self.loaders.train is not None else None, "targets", None)
        if self.cfg.multilabel is not None or targets is None:
            return None
        return np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(self.class_names)).tolist()

    def run_epoch(self, net: nn.Module, epoch: int) -> dict[str, Any]:
        """Train one epoch (0-based), validate when due, step the schedule, save; returns the log record."""
        cfg, started = self.cfg, time.time()
        self.loaders.train.sampler.set_epoch(epoch)
        self.loaders.generator.manual_seed(epoch_seed(cfg.run.seed, epoch, self.dist.rank, stream=1))
        stats = train_one_epoch(
            net, self.task.criterion, self.loaders.train, self.state.optimizer, self.dist.device, epoch,
            loss_scaler=self.state.scaler, amp_dtype=amp_dtype(cfg.run.amp, self.dist.device),
            accumulation_steps=cfg.optim.accumulation_steps, clip_grad=cfg.optim.clip_grad or None,
            clip_mode=cfg.optim.clip_mode, model_ema=self.state.ema, mixup_fn=self.task.mixup_fn,
            print_freq=cfg.run.print_freq, header=f"Epoch {epoch + 1}/{cfg.optim.epochs}",
            memory_format=memory_format(cfg.run.channels_last),
            on_update=lambda n: self.state.scheduler.step_update(epoch * self.updates_per_epoch + n),
        )
        done = epoch + 1
        record = {"epoch": done, "lr": stats["lr"], "train_loss": stats["loss"]}
        improved = None
        if done % cfg.run.eval_every == 0 or done == cfg.optim.epochs:
            improved = self._validate_epoch(net, record)
        else:
            self.state.scheduler.step(done)
        self.guard.check(record, stats["first_loss"])
        check_finite_weights(self.model, done)
        rng_states = utils.all_gather_objects(utils.get_rng_state())
        record["time"] = time.time() - started
        if self.folder.path is not None:
            self.folder.save_epoch(self._checkpoint(epoch, rng_states), record, improved, cfg.run.save_every)
        utils.print_main(epoch_summary(record, cfg.optim.epochs, self.best, self.task.best_key))
        return record

    def _validate_epoch(self, net: nn.Module, record: dict[str, Any]) -> str | None:
        """Validate the weights (and the EMA's when it is on the device), add the results to ``record``, update
        the best result and step the schedule; returns the weights that set a new best, if any."""
        validate = functools.partial(_validate, self.cfg, self.dist, self.loaders, self.task)
        results = {"model": validate(net, self.task.metric_factory())}
        if self.state.ema is not None and not (self.cfg.ema.force_cpu and self.dist.device.type != "cpu"):
            results["model_ema"] = validate(self.state.ema.module, self.task.metric_factory(), header="Val (EMA)")
        improved, key = None, self.task.best_key
        for source, stats in results.items():
            prefix = "val_" if source == "model" else "ema_val_"
            record.update({prefix + name: value for name, value in stats.items()})
            if stats[key] > self.best.metric:
                self.best, improved = Best(stats[key], source, record["epoch"]), source
        self.state.scheduler.step(record["epoch"], results["model"][key])
        return improved

    def _checkpoint(self, epoch: int, rng_states: list) -> dict[str, Any]:
        state = self.state
        checkpoint = training_checkpoint(
            model=self.model.state_dict(), optimizer=state.optimizer.state_dict(),
            lr_scheduler=state.scheduler.state_dict(),
            scaler=state.scaler.state_dict() if state.scaler is not None else None, epoch=epoch, best=self.best,
            best_key=self.task.best_key, args=self.args, class_names=self.class_names, config=self.config,
            rng_states=rng_states, model_ema=state.ema.module.state_dict() if state.ema is not None else None,
        )
        if list(self.task.criterion.parameters()):  # ArcFace proxies: resumed with the run
            checkpoint[CRITERION_KEY] = self.task.criterion.state_dict()
        return checkpoint


CRITERION_KEY = "criterion"  # the checkpoint entry of a criterion's own parameters


def restore_criterion(criterion: nn.Module, state: dict[str, Any] | None, path: str) -> None:
    """Load the criterion's parameters saved in the resumed checkpoint (a criterion without any has none)."""
    if not list(criterion.parameters()):
        return
    if state is None:
        raise UserError(f"{path} holds no {CRITERION_KEY} state (the loss's class proxies): resume with the "
                        "checkpoint's --loss")
    try:
        criterion.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"the loss state in {path} does not fit this run ({str(err).splitlines()[0]}); resume with "
                        "the checkpoint's --loss and --subcenters") from None


def epoch_summary(record: dict[str, Any], epochs: int, best: Best, best_key: str) -> str:
    """The line printed after each epoch: losses, lr, validation values, the best result and the time."""
    parts = [f"train loss {record['train_loss']:.4f}", f"lr {record['lr']:.3e}"]
    for prefix, label in (("val_", "val"), ("ema_val_", "EMA val")):
        values = [f"{key[len(prefix):]} {value if isinstance(value, int) else format(value, '.4f')}"
                  for key, value in record.items() if key.startswith(prefix)]
        if values:
            parts.append(f"{label} " + " ".join(values))
    if best.source:
        parts.append(f"best {best_key} {best.metric:.4f} ({best.source}, epoch {best.epoch})")
    return f"Epoch {record['epoch']}/{epochs}: " + ", ".join(parts) + f" [{record['time']:.1f}s]"
