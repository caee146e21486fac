"""A loaded artist model: classify images and extract style features, one image or many (batched)."""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from data.transforms import normalize_batch
from inference.batching import run_batched
from inference.compiled import PaddedCompiledModel
from inference.results import DESCRIPTORS, BatchedModel, ImageInput, SkippedImage
from utils import UserError


def _require_finite(output: Any, checkpoint: Path | None, amp: bool) -> None:
    """Refuse a model whose outputs are NaN or infinite (a diverged training run) before it writes any result."""
    tensors = output if isinstance(output, tuple) else (output,)
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return
    hint = "run without --amp, or use" if amp else "use"
    raise UserError(f"{checkpoint or 'the model'} gives NaN or infinite outputs on the first batch (its training "
                    f"diverged?); {hint} an earlier checkpoint of the run")


class ArtistModel(BatchedModel):
    """A loaded artist model with its preprocessing and class names. Build it with :func:`load_model_bundle`.

    Methods take one image (PIL image, path or file object) and return one result, or a list of images and
    return a list (or, for features, an ``(N, feature_dim)`` array). Built directly, ``model`` must already be
    in eval mode on ``device`` (fused or not) and ``transform`` its eval preprocessing (uint8 output is normalised
    with ``data_config``'s ``mean``/``std``, float output is used as it is). ``config`` is the training
    ``config.json`` (e.g. ``multi_label``: trained with sigmoid outputs). With ``compile``, batches run through
    :class:`inference.compiled.PaddedCompiledModel`. A model whose first outputs are not finite is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        class_names: list[str] | None = None,
        *,
        device: torch.device | str = "cpu",
        amp: bool = False,
        model_name: str | None = None,
        data_config: dict[str, Any] | None = None,
        checkpoint: Path | None = None,
        config: dict[str, Any] | None = None,
        compile: bool = False,
    ):
        self.model = model
        self.transform = transform
        self.class_names = class_names
        self.device = torch.device(device)
        self.amp = amp
        self.model_name = model_name
        self.data_config = data_config or {}
        self.checkpoint = checkpoint
        self.config = config or {}
        self._compiled = PaddedCompiledModel(model) if compile else None
        self._outputs_checked = False  # whether a first batch showed finite outputs

    @property
    def runs_on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def input_size(self) -> int:
        return int(self.data_config.get("input_size", (3, 224, 224))[-1])

    @property
    def feature_dim(self) -> int:
        """Size of the style feature vector (the one place that reads the network's attributes)."""
        return int(self.model.texture_dim if self.descriptor == "texture" else self.model.head_hidden_size)

    @property
    def descriptors(self) -> tuple[str, ...]:
        """Pooled and texture style vectors (``LSNet.forward_texture``) for LSNet models."""
        return DESCRIPTORS if hasattr(self.model, "forward_texture") else ("pooled",)

    def autocast(self) -> torch.autocast:
        """The model's mixed-precision context: float16 on CUDA, bfloat16 on the CPU; a no-op unless ``amp``."""
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp)

    def run_model(self, batch: torch.Tensor, batch_size: int | None = None, **kwargs: Any) -> Any:
        """The model's output for a batch of :attr:`transform` outputs already on :attr:`device`: normalised,
        under :meth:`autocast`, compiled when built with ``compile``. Call it under ``torch.inference_mode()``.

        ``batch_size`` is the run's batch size: a compiled model pads smaller batches to it, so it compiles once per
        batch size (default: pad to the largest batch so far). The first batch's outputs must be finite.
        """
        batch = normalize_batch(batch, self.data_config.get("mean", IMAGENET_DEFAULT_MEAN),
                                self.data_config.get("std", IMAGENET_DEFAULT_STD))
        with self.autocast():
            if self._compiled is None:
                output = self.model(batch, **kwargs)
            else:
                output = self._compiled(batch, batch_size or 0, **kwargs)
        if not self._outputs_checked:
            _require_finite(output, self.checkpoint, self.amp)
            self._outputs_checked = True
        return output

    def _batches(self, images: Sequence[ImageInput], names: Sequence[str], mode: str, batch_size: int,
                 num_workers: int, skipped: list[SkippedImage] | None,
                 progress: bool) -> Iterator[tuple[list[str], np.ndarray | None, np.ndarray | None]]:
        """Per batch of readable images: (names, features or None, probabilities or None) as float32 numpy."""
        def compute(batch: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
            texture = {"texture": True} if self.descriptor == "texture" else {}
            if mode == "cluster":
                features, logits = self.run_model(batch, batch_size, return_features=True, **texture), None
            else:
                features, logits = self.run_model(batch, batch_size, return_both=True, **texture)
            probs = None if logits is None else self.probabilities(logits.float().cpu().numpy())
            return (None if mode == "classify" else features.float().cpu().numpy()), probs

        for batch_names, (features, probs) in run_batched(
            compute, images, self.transform, names=names, batch_size=batch_size, num_workers=num_workers,
            device=self.device, skipped=skipped, progress=progress, desc=mode,
        ):
            yield batch_names, features, probs

    def logits_batches(self, images: Sequence[ImageInput], names: Sequence[str], *, batch_size: int = 32,
                       num_workers: int = 0, skipped: list[SkippedImage] | None = None,
                       progress: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
        def compute(batch: torch.Tensor) -> np.ndarray:
            return self.run_model(batch, batch_size).float().cpu().numpy()

        yield from run_batched(compute, images, self.transform, names=names, batch_size=batch_size,
                               num_workers=num_workers, device=self.device, skipped=skipped, progress=progress,
                               desc="predict")
