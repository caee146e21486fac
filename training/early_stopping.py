"""``--patience N``: stop when the monitored validation metric has not improved for N validations."""

from typing import Any

from artifacts.run_folder import Best

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Counts the validations since the best result; :meth:`update` says when to stop (``patience`` 0: never)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.waited = 0
        self.stopped = False

    def update(self, record: dict[str, Any], best: Best) -> bool:
        """After an epoch's ``record``: True when training should stop (counted only on validated epochs)."""
        if not any(key.startswith("val_") for key in record):
            return False
        self.waited = 0 if best.epoch == record["epoch"] else self.waited + 1
        self.stopped = self.patience > 0 and self.waited >= self.patience
        return self.stopped

    def message(self, best: Best, best_key: str) -> str:
        return (f"early stop: {best_key} has not improved for {self.waited} validations (--patience "
                f"{self.patience}); the best was epoch {best.epoch}")
