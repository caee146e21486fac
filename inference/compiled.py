"""A ``torch.compile``-d inference model that compiles once per run: partial batches are padded to the run's size."""

from typing import Any

import torch
from torch import nn

from utils import UserError, compile_for_inference


class PaddedCompiledModel:
    """``model`` through :func:`utils.compile_for_inference`. A batch smaller than the run's batch size (default: the
    largest batch so far) is padded with zeros to it and the padding dropped from the outputs, so partial batches do
    not compile the model again. A failure of the first compilation is a :class:`UserError`."""

    def __init__(self, model: nn.Module):
        self._compiled = compile_for_inference(model)
        self._largest = 0  # largest batch the compiled model has run (0: not compiled yet)

    def __call__(self, batch: torch.Tensor, batch_size: int = 0, **kwargs: Any) -> Any:
        count = len(batch)
        padded = max(count, batch_size or self._largest)
        if count < padded:
            batch = torch.cat([batch, batch.new_zeros((padded - count, *batch.shape[1:]))])
        try:
            output = self._compiled(batch, **kwargs)
        except Exception as err:  # Inductor needs a C++ compiler on the CPU and Triton on a GPU
            if self._largest:
                raise
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"torch.compile failed on this machine ({detail}); run without --compile") from err
        self._largest = max(self._largest, padded)
        if isinstance(output, tuple):
            return tuple(out[:count] for out in output)
        return output[:count]
