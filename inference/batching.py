"""Batched inference over many images: decoding workers, batches on the device, skipped-file tracking, progress.

:func:`run_batched` is the generic part that every prediction script reuses with its own per-batch computation.
"""

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.images import ImageLoadError, load_image, to_rgb
from inference.results import ImageInput, SkippedImage, report_skipped


class _ImageDataset(Dataset):
    """Decodes (shared loader) and preprocesses one image; an unreadable one becomes ``(name, None, reason)``."""

    def __init__(self, images: Sequence[ImageInput], names: Sequence[str], transform: Callable):
        self.images = images
        self.names = names
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        image = self.images[index]
        try:
            # In-memory images get the loader's conversions too (EXIF orientation, transparency on white, ...).
            image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        except ImageLoadError as err:
            return self.names[index], None, err.reason
        return self.names[index], self.transform(image), None


Batch = tuple[list[str], torch.Tensor | None, list[SkippedImage]]  # names, stacked readable images, skipped


def _collate_readable(batch: list[tuple[str, torch.Tensor | None, str | None]]) -> Batch:
    """Stack the readable images of a batch; report the unreadable ones separately (so no output row shifts)."""
    names = [name for name, tensor, _ in batch if tensor is not None]
    tensors = [tensor for _, tensor, _ in batch if tensor is not None]
    skipped = [SkippedImage(name, reason) for name, tensor, reason in batch if tensor is None]
    return names, torch.stack(tensors) if tensors else None, skipped


def _decode_in_turns(dataset: _ImageDataset, batch_size: int, threads: int) -> Iterator[Batch]:
    """Batches decoded by a pool of ``threads`` threads, one batch at a time (PIL releases the GIL while it decodes
    and resamples). For a model on the CPU: decoding and the model take turns on all cores, instead of worker
    processes preempting the model's threads mid-computation (on 2 cores 0.79 instead of 0.67 of the model-only
    images/s, bench/results.md)."""
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            yield _collate_readable(list(pool.map(dataset.__getitem__, indices)))


def run_batched(
    compute: Callable[[torch.Tensor], Any],
    images: Sequence[ImageInput],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    skipped: list[SkippedImage] | None = None,
    progress: bool = False,
    desc: str = "inference",
) -> Iterator[tuple[list[str], Any]]:
    """Yield ``(names, compute(batch))`` for batches of images decoded and preprocessed by ``num_workers`` workers.

    For a CUDA device the workers are DataLoader processes that decode the next batches while the GPU computes; for
    the CPU they are threads that decode each batch in turn with the model (see :func:`_decode_in_turns`).

    ``images`` are paths, file objects or PIL images; ``names`` (default: ``str`` of each path, or its index)
    label them. ``compute`` gets a batch tensor on ``device`` and runs under ``torch.inference_mode``.
    Unreadable images are dropped from their batch, so outputs always line up with the yielded names: with a
    ``skipped`` list they are appended to it and warned about once on stderr, without one the first raises
    :class:`data.images.ImageLoadError`.
    """
    if names is None:
        names = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else str(i) for i, im in enumerate(images)]
    device = torch.device(device)
    dataset = _ImageDataset(images, names, transform)
    batches: Iterable[Batch]
    if device.type == "cpu" and num_workers > 0:
        batches = _decode_in_turns(dataset, batch_size, min(num_workers, batch_size))
    else:
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_readable,
                             num_workers=min(num_workers, math.ceil(len(images) / batch_size)),
                             pin_memory=device.type == "cuda")
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch_names, batch, batch_skipped in batches:
            report_skipped(batch_skipped, skipped, lambda line: tqdm.write(line, file=sys.stderr))
            if batch is not None:
                with torch.inference_mode():
                    output = compute(batch.to(device, non_blocking=True))
                yield batch_names, output
            bar.update(len(batch_names) + len(batch_skipped))


