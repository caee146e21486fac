"""The model behind the service: runs batches of decoded uploads and formats the answers of each endpoint."""

import hashlib
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import UploadFile
from PIL import Image

from inference.results import select_labels
from predictor import BatchedModel
from service.batcher import BatchObserver, DynamicBatcher
from service.limits import ServiceError, Upload, read_uploads
from service.settings import Settings

LOG = logging.getLogger("uvicorn.error")  # the server's log
T = TypeVar("T")


def file_version(path: Path | None) -> str:
    """The first 12 hex digits of a file's SHA-256 (``unknown`` without a file)."""
    if path is None or not Path(path).is_file():
        return "unknown"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


class Engine:
    """One loaded model (:class:`predictor.BatchedModel`: PyTorch, ONNX or glance-and-focus) serving requests:
    uploads are decoded on ``settings.decode_threads`` threads, their images batched with those of concurrent
    requests (:class:`DynamicBatcher`) and run with :meth:`BatchedModel.run_paths`, the computation of
    ``inference_artist.py``.

    ``users`` counts the requests holding it (:meth:`service.runtime.Service.use`), so that an engine replaced by a
    reload is stopped only once they are answered."""

    def __init__(self, model: BatchedModel, settings: Settings, observe: BatchObserver | None = None):
        self.model = model
        self.settings = settings
        self.multi_label = bool(model.config.get("multi_label"))
        self.version = file_version(model.checkpoint)
        self.batcher = DynamicBatcher(self._run, settings.max_batch, settings.max_wait_ms / 1000, observe,
                                      model.lanes)
        self.users = 0
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the decoding threads and the batcher."""
        self._pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        await self.batcher.start()

    async def stop(self) -> None:
        """Stop the batcher and the decoding threads."""
        await self.batcher.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def on_model_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the model thread, in turn with the batches (call it from a worker thread)."""
        return self.batcher.call_blocking(fn)

    async def _submit(self, key: Hashable, images: list[Image.Image]) -> list[Any]:
        """The batcher's results; a failed model call is a 500 for the requests in its batch (logged)."""
        try:
            return await self.batcher.submit(key, images)
        except Exception as err:
            LOG.error("the model failed on a batch", exc_info=err)
            raise ServiceError(500, f"the model failed on this batch ({type(err).__name__}: {err}); "
                                    "see the service's log") from err

    def _run(self, key: Hashable, images: list[Image.Image]) -> list[Any]:
        """One model call for a batch: per image ``{"classification": [...], ...extras}``
        (``("classify", top_k, threshold)``; a glance-and-focus model adds ``glance_focus``) or a feature row."""
        mode, top_k, threshold = key  # type: ignore[misc]
        # Threads resize the images in turns with a CPU model of one lane; a model of several lanes resizes them on
        # this model thread, beside the other lanes' batches; a GPU model resizes them itself (no worker processes).
        workers = self.settings.decode_threads if self.model.runs_on_cpu and self.model.lanes == 1 else 0
        result = self.model.run_paths(images, mode, top_k=top_k, threshold=threshold, batch_size=len(images),
                                      num_workers=workers, skip_unreadable=False)
        if mode != "classify":
            return list(result.features)
        return [entry for _, entry in result.entries(include_features=False)]

    async def uploads(self, files: Sequence[UploadFile]) -> list[Upload]:
        """The uploads decoded on the decoding threads (the first bad one is its 4xx ServiceError)."""
        assert self._pool is not None, "the engine runs inside its app's lifespan"
        return await read_uploads(files, self._pool)

    async def _images(self, files: Sequence[UploadFile]) -> tuple[list[str], list[Image.Image]]:
        uploads = await self.uploads(files)
        return [u.name for u in uploads], [u.image for u in uploads]

    async def classify(self, files: Sequence[UploadFile], top_k: int, threshold: float) -> list[dict[str, Any]]:
        """Per upload: ``classification`` (single-label) or ``labels`` with ratios (multi-label)."""
        names = self.model.class_names
        if names is None:
            raise ServiceError(400, f"{self.model.checkpoint} has no class names, so it cannot classify; "
                                    "use /v1/features, or start the service with its class_mapping.csv")
        upload_names, images = await self._images(files)
        if not self.multi_label:
            entries = await self._submit(("classify", top_k, threshold), images)
            return [{"file": file, **entry} for file, entry in zip(upload_names, entries, strict=True)]
        # Every label's confidence, then the selection of predict_artist_multilabel.py.
        entries = await self._submit(("classify", len(names), 0.0), images)
        results = []
        for file, entry in zip(upload_names, entries, strict=True):
            confidences = torch.zeros(len(names))
            for score in entry["classification"]:
                confidences[score["class_id"]] = score["probability"]
            results.append({"file": file,
                            "labels": select_labels(confidences, names, top_k, threshold, normalize_ratio=True)})
        return results

    async def feature_rows(self, files: Sequence[UploadFile]) -> tuple[list[str], list[Any]]:
        """The uploads' names and style vectors (batched with other requests)."""
        upload_names, images = await self._images(files)
        return upload_names, await self._submit(("cluster", 1, 0.0), images)

    async def features(self, files: Sequence[UploadFile]) -> list[dict[str, Any]]:
        """Per upload: its style vector."""
        upload_names, rows = await self.feature_rows(files)
        return [{"file": file, "features": row.tolist()} for file, row in zip(upload_names, rows, strict=True)]

    def info(self, gallery: dict[str, Any] | None) -> dict[str, Any]:
        """What ``GET /v1/model`` reports."""
        model, settings = self.model, self.settings
        return {
            "model": model.model_name, "classes": model.class_names,
            "num_classes": None if model.class_names is None else len(model.class_names),
            "multi_label": self.multi_label, "input_size": model.input_size, "feature_dim": model.feature_dim,
            "descriptor": model.descriptor,
            "checkpoint": Path(model.checkpoint).name if model.checkpoint else "", "version": self.version,
            "gallery": gallery,
            "limits": {"max_files": settings.max_files, "max_upload_mb": settings.max_upload_mb,
                       "max_pixels": settings.max_pixels, "max_batch": settings.max_batch,
                       "max_queue": settings.max_queue},
        }
