"""The training and validation loops: one epoch of optimisation, one pass of evaluation."""

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, unwrap_model
from torch import nn
from torch.utils.data import DataLoader

import utils
from losses import DistillationLoss
from training.guard import ADVICE, last_good_epoch
from training.metrics import Metric, TopKAccuracy
from utils import UserError

__all__ = ["evaluate", "train_one_epoch"]


def _global_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over all processes (a sync point, so every process sees the same non-finite loss)."""
    value = value.detach().float().reshape(1).clone()
    return utils.all_reduce_sum(value).item() / utils.get_world_size()


def _after_update(model: nn.Module, optimizer: torch.optim.Optimizer, model_ema: ModelEmaV3 | None) -> None:
    """After an optimizer step: clear the gradients, update the EMA weights."""
    optimizer.zero_grad(set_to_none=True)
    if model_ema is not None:
        model_ema.update(unwrap_model(model))


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    *,
    loss_scaler: NativeScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    accumulation_steps: int = 1,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    model_ema: ModelEmaV3 | None = None,
    mixup_fn: Callable | None = None,
    set_training_mode: bool = True,
    print_freq: int = 50,
    header: str | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
    on_update: Callable[[int], None] | None = None,
    advice: str = ADVICE,
) -> dict[str, float]:
    """One pass over ``data_loader``; returns the mean training ``loss``, the last ``lr`` and the ``first_loss``.

    ``criterion(outputs, targets)`` (a :class:`~losses.DistillationLoss` is called with the inputs first; a criterion
    with ``needs_features`` gets the style vectors, ``model(x, return_features=True)``, instead of the logits). The
    optimizer steps once per ``accumulation_steps`` micro-batches, on the mean of their losses (a shorter last group
    is averaged over its own size); non-final micro-batches skip the DDP gradient all-reduce (``no_sync``). A
    non-finite loss on any process raises :class:`UserError` naming the epoch and step (0-based ``epoch``, shown
    1-based). Batches are moved to ``device`` in ``memory_format``. ``on_update(n)`` is called after the epoch's
    n-th optimizer step (the learning-rate schedule). ``advice``: what the non-finite loss error suggests (the
    flags of the calling script).
    """
    model.train(set_training_mode)
    num_steps, world_size = len(data_loader), utils.get_world_size()
    progress = utils.Progress(num_steps, header or f"Epoch {epoch + 1}", print_freq)
    no_sync = getattr(model, "no_sync", None)
    loss_sum, images, first_loss = 0.0, 0, math.nan
    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in enumerate(data_loader):
        samples, targets = _prepare_batch(samples, targets, device, memory_format, mixup_fn)
        group_size, update = _accumulation_group(step, num_steps, accumulation_steps)
        with nullcontext() if update or no_sync is None else no_sync():
            loss = _forward_loss(model, criterion, samples, targets, device, amp_dtype)
            loss_value = _global_mean(loss)
            if not math.isfinite(loss_value):
                progress.close()
                raise _non_finite_loss(loss_value, epoch, step, num_steps, advice)
            _backward(loss / group_size, model, optimizer, loss_scaler, clip_grad, clip_mode, update)
        if update:
            _after_update(model, optimizer, model_ema)
            if on_update is not None:
                on_update(step // accumulation_steps + 1)  # groups of accumulation_steps: the n-th optimizer step
        batch = targets.shape[0] * world_size
        first_loss = loss_value if step == 0 else first_loss
        loss_sum, images = loss_sum + loss_value * batch, images + batch
        progress.update(batch, lr=optimizer.param_groups[0]["lr"], loss=loss_value)
    progress.close()
    return {"loss": loss_sum / max(images, 1), "lr": optimizer.param_groups[0]["lr"], "first_loss": first_loss}


def _prepare_batch(samples: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor, device: torch.device,
                   memory_format: torch.memory_format, mixup_fn: Callable | None
                   ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
    """A loader batch on ``device`` (inputs in ``memory_format``), mixed by ``mixup_fn`` when given."""
    samples = _to_device(samples, device, memory_format)
    targets = targets.to(device, non_blocking=True)
    return mixup_fn(samples, targets) if mixup_fn is not None else (samples, targets)


def _forward_loss(model: nn.Module, criterion: nn.Module, samples: torch.Tensor | tuple[torch.Tensor, ...],
                  targets: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The training loss of one micro-batch (a :class:`~losses.DistillationLoss` also gets the inputs; a criterion
    with ``needs_features`` gets the style vectors instead of the logits)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        needs_features = getattr(criterion, "needs_features", False)  # metric losses take the style vectors
        outputs = model(samples, return_features=True) if needs_features else model(samples)
        if isinstance(criterion, DistillationLoss):
            return criterion(samples, outputs, targets)
        return criterion(outputs, targets)


def _to_device(samples: torch.Tensor | tuple[torch.Tensor, ...], device: torch.device,
               memory_format: torch.memory_format) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A batch's inputs on ``device``: a tensor, or a tuple of them (glance-and-focus views)."""
    if isinstance(samples, (tuple, list)):
        return tuple(_to_device(item, device, memory_format) for item in samples)
    return samples.to(device, non_blocking=True, memory_format=memory_format)


def _accumulation_group(step: int, num_steps: int, accumulation_steps: int) -> tuple[int, bool]:
    """Micro-batches in the group of ``step`` (the last group may be shorter), and whether ``step`` ends it."""
    group_start = step - step % accumulation_steps
    group_size = min(accumulation_steps, num_steps - group_start)
    return group_size, step == group_start + group_size - 1


def _non_finite_loss(value: float, epoch: int, step: int, num_steps: int, advice: str) -> UserError:
    return UserError(f"loss is {value} at epoch {epoch + 1}, step {step + 1}/{num_steps}: training stopped and this "
                     f"epoch was not saved; {last_good_epoch(epoch + 1)}; {advice}")


def _backward(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
              loss_scaler: NativeScaler | None, clip_grad: float | None, clip_mode: str, update: bool) -> None:
    """Backward pass, and on ``update`` clipping and the optimizer step (through the scaler with CUDA float16)."""
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=model.parameters(),
                    need_update=update)
        return
    loss.backward()
    if update:
        if clip_grad:
            dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
        optimizer.step()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data_loader: DataLoader,
    device: torch.device,
    criterion: nn.Module | None = None,
    metric: Metric | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    distributed: bool = False,
    print_freq: int = 50,
    header: str = "Val",
    memory_format: torch.memory_format = torch.preserve_format,
) -> dict[str, float]:
    """Mean ``loss`` (default: cross-entropy) and the ``metric`` values (default: top-1/top-5 accuracy).

    With ``distributed`` the loader holds this process's shard and the results are combined over processes.
    Batches are moved to ``device`` in ``memory_format``.
    """
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    metric = metric if metric is not None else TopKAccuracy()
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, image count
    progress = utils.Progress(len(data_loader), header, print_freq)
    scale = utils.get_world_size() if distributed else 1
    for images, target in data_loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        loss = criterion(output, target)
        totals += torch.stack([loss.double() * target.shape[0], loss.new_tensor(target.shape[0], dtype=torch.float64)])
        metric.update(output, target)
        progress.update(images.shape[0] * scale)
    progress.close()
    if distributed:
        utils.all_reduce_sum(totals)
    return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), **metric.compute(distributed)}
