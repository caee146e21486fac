"""What the service serves at a moment (model, gallery) and its changes: gallery writes and reloads.

Requests take the current :class:`Runtime` once and answer from it to the end. A change builds a new Runtime and
swaps it in with one assignment, so every request sees the old model and gallery or the new ones, never a mix. Changes
run one at a time (one lock); a reload starts the new model's batcher before the swap and stops the old one once the
requests holding it are answered.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI
from PIL import Image

from predictor import BatchedModel, load_model_bundle
from retrieval.gallery import BaseGallery
from service.engine import Engine
from service.gallery_admin import GalleryStore
from service.limits import ServiceError
from service.metrics import Metrics
from service.settings import Settings
from service.similar import GallerySearch
from utils import UserError

LOG = logging.getLogger("uvicorn.error")
RETIRE_TIMEOUT_S = 120.0  # an old model waits at most this long for its last requests


@dataclass(frozen=True)
class Source:
    """Where the served model and gallery come from: what ``serve.py`` loads at start and a reload loads again."""

    checkpoint: str
    gallery: str | None = None
    device: str | None = None
    amp: bool = False
    compile: bool = False
    engine: dict[str, Any] = field(default_factory=dict)  # load_model_bundle's engine options (--engine)

    def load(self) -> tuple[BatchedModel, BaseGallery | None, GalleryStore | None]:
        """The model, and the gallery (checked against it) with its store; a problem is a UserError."""
        model = load_model_bundle(self.checkpoint, device=self.device, amp=self.amp, compile=self.compile,
                                  **self.engine)
        if self.gallery is None:
            return model, None, None
        store = GalleryStore(self.gallery)
        return model, store.load(model), store


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Runtime:
    """One served state: the engine (model and batcher), the gallery search, where they came from."""

    engine: Engine
    search: GallerySearch | None
    store: GalleryStore | None  # None: the gallery cannot be changed (none loaded, or given without its folder)
    source: Source | None  # None: no reload (the app was given a model without where it came from)
    loaded_at: str
    reloads: int = 0

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` reports: the model, its version and the gallery."""
        gallery = self.search.info() if self.search is not None else None
        return {**self.engine.info(gallery), "loaded_at": self.loaded_at, "reloads": self.reloads}


class Service:
    """The current :class:`Runtime` of an app, its changes and their lock."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: Metrics):
        self.current = runtime
        self.settings = settings
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Run the current engine while the app runs; the loader's pixel limit is the service's meanwhile."""
        saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, self.settings.max_pixels
        self._loop = asyncio.get_running_loop()
        await self.current.engine.start()
        try:
            yield
        finally:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.current.engine.stop()
            Image.MAX_IMAGE_PIXELS = saved_limit

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Runtime]:
        """The current runtime, held (its engine keeps running) until the block ends."""
        runtime = self.current
        runtime.engine.users += 1
        try:
            yield runtime
        finally:
            runtime.engine.users -= 1

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def change_gallery(self, operation: str, change: Callable[[Runtime, BaseGallery, GalleryStore], BaseGallery]
                             ) -> tuple[Runtime, Runtime]:
        """Run ``change`` (it stores and returns the new gallery; on a worker thread) under the lock, then swap the
        new gallery in; the stored and served galleries stay as they were when it fails. Returns the runtimes
        before and after."""
        async with self._lock:
            runtime = self.current
            if runtime.search is None:
                raise ServiceError(404, "no gallery is loaded; start serve.py with --gallery GALLERY "
                                        "(tools/build_gallery.py makes one)")
            if runtime.store is None:
                raise ServiceError(409, "the gallery was given without its folder, so it cannot be changed; start "
                                        "serve.py with --gallery GALLERY")
            try:
                gallery = await asyncio.to_thread(change, runtime, runtime.search.gallery, runtime.store)
            except BaseException:
                self.metrics.gallery_writes.labels(operation, "error").inc()
                raise
            self.current = replace(runtime, search=GallerySearch(gallery))
            self.metrics.gallery_writes.labels(operation, "ok").inc()
            return runtime, self.current

    async def reload(self, checkpoint: str | None = None, gallery: str | None = None) -> Runtime:
        """Load the model and gallery again (from new paths when given) and swap them in once ready; a failure
        keeps the current ones serving and is a one-line ServiceError."""
        async with self._lock:
            old = self.current
            if old.source is None:
                raise ServiceError(409, "this service was given a loaded model without its folder, so it cannot "
                                        "reload; start it with serve.py")
            source = replace(old.source, checkpoint=checkpoint or old.source.checkpoint,
                             gallery=gallery or old.source.gallery)
            try:
                model, new_gallery, store = await asyncio.to_thread(source.load)
                search = await asyncio.to_thread(GallerySearch, new_gallery) if new_gallery is not None else None
                engine = Engine(model, self.settings, self.metrics.observe_batch)
                await engine.start()
            except Exception as err:
                self.metrics.reloads.labels("error").inc()
                user = isinstance(err, UserError)
                reason = (str(err) if user else f"{type(err).__name__}: {err}").strip().split("\n")[0]
                LOG.error("reload failed: %s", reason, exc_info=None if user else err)
                raise ServiceError(422 if user else 500, f"reload failed, still serving version "
                                                         f"{old.engine.version}: {reason}") from None
            self.current = Runtime(engine, search, store, source, now(), old.reloads + 1)
            self.metrics.reloads.labels("ok").inc()
        self._spawn(self._retire(old.engine))
        LOG.info("reloaded %s (version %s, reload %d)", source.checkpoint, engine.version, self.current.reloads)
        return self.current

    async def _retire(self, engine: Engine) -> None:
        """Stop a replaced engine once no request holds it (or after RETIRE_TIMEOUT_S)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETIRE_TIMEOUT_S
        while engine.users and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await engine.stop()

    def reload_soon(self) -> None:
        """Reload from a signal handler or another thread (SIGHUP); the outcome goes to the log."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._spawn(self._logged_reload()))

    async def _logged_reload(self) -> None:
        try:
            await self.reload()
        except ServiceError:
            pass  # reload() logged why
