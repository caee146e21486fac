"""Keeping a diverged epoch out of the run folder: a non-finite or exploding loss stops training before the epoch is
saved, so it never becomes ``checkpoint.pth`` or ``model_best.pth``.

An epoch has diverged when its mean training loss is not finite or more than :data:`EXPLOSION_FACTOR` times the
reference loss, or when any validation value (loss or metric, of the weights or of the EMA) is not finite. The
reference is the mean training loss of the run's first epoch (read back from ``train_log.txt`` on resume); during
the first epoch itself, the loss of its first step (the untrained model's).
"""

import math
import os
from collections.abc import Mapping
from typing import Any

from artifacts.run_folder import read_log_records
from utils import UserError

__all__ = ["EXPLOSION_FACTOR", "DivergenceGuard", "last_good_epoch"]

EXPLOSION_FACTOR = 1e3
ADVICE = "lower --lr, raise --warmup-epochs, keep --clip-grad, or train without --amp"


def last_good_epoch(done: int) -> str:
    """What is left when 1-based epoch ``done`` fails: every earlier epoch was saved when it ended."""
    if done <= 1:
        return "no epoch was saved"
    return f"the last good epoch is {done - 1} (its checkpoint.pth is intact)"


class DivergenceGuard:
    """Checks each epoch's log record before it is saved (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike | None, resuming: bool, part: Mapping[str, Any] | None = None,
                 advice: str = ADVICE):
        """``part``: the log fields of this run's records where one log holds several (``{"stage": 2}``);
        ``advice``: what the error suggests (the flags of the script)."""
        self.reference: float | None = None
        self.advice = advice
        if resuming and output_dir:
            records = [r for r in read_log_records(output_dir) if all(r.get(k) == v for k, v in (part or {}).items())]
            first = next((r for r in records if r.get("epoch") == 1), None)
            loss = first.get("train_loss") if first else None
            self.reference = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None

    def check(self, record: dict[str, Any], first_step_loss: float) -> None:
        """Raise :class:`UserError` when the epoch of ``record`` diverged; otherwise remember the reference."""
        done, train_loss = record["epoch"], record["train_loss"]
        reference = self.reference if self.reference is not None else first_step_loss
        problem = None
        if not math.isfinite(train_loss):
            problem = f"train loss {train_loss}"
        elif train_loss > EXPLOSION_FACTOR * max(reference, 1e-3):
            problem = f"train loss {train_loss:.3g}, over {EXPLOSION_FACTOR:g} x the first epoch's {reference:.3g}"
        else:
            bad = [f"{key} {value}" for key, value in record.items()
                   if "val_" in key and isinstance(value, float) and not math.isfinite(value)]
            problem = ", ".join(bad) or None
        if problem:
            raise UserError(f"epoch {done} diverged ({problem}): training stopped and this epoch was not saved; "
                            f"{last_good_epoch(done)}; {self.advice}")
        if self.reference is None:
            self.reference = train_loss
