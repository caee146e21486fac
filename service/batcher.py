"""Dynamic batching: images from requests that arrive together go through the model in one call."""

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

# Runs one batch: (key, images) -> one result per image, in order. Called on the batcher's model thread.
BatchRunner = Callable[[Hashable, list[Image.Image]], Sequence[Any]]
# Told of every model call: (key, images in it, seconds it took).
BatchObserver = Callable[[Hashable, int, float], None]


@dataclass
class _Item:
    key: Hashable
    image: Image.Image
    future: asyncio.Future


class DynamicBatcher:
    """Collects images submitted by concurrent requests into batches and runs them on ``lanes`` model threads.

    A batch starts with the first waiting image once a model thread is free; its images are grouped by ``key`` (e.g.
    the computation and top-k asked for) and each group is one ``run`` call. Each model thread runs one group at a
    time, so the model is called by at most ``lanes`` threads at once: one for a PyTorch model, one per core for
    onnxruntime (:attr:`predictor.BatchedModel.lanes`), whose batches then overlap each other's preprocessing and the
    requests' decoding instead of taking turns with them.

    With one lane a batch takes every image submitted within ``max_wait_s`` after its first, up to ``max_batch``: a
    bigger batch costs less per image. With several lanes (each a core, where an image costs about the same in a
    batch of 2 as of 32) a batch does not wait: it takes its lane's share of the images in the batcher, waiting or
    running (at most ``max_batch``), so that images arriving together spread over the lanes instead of queueing
    behind one lane while another idles.
    """

    def __init__(self, run: BatchRunner, max_batch: int, max_wait_s: float, observe: BatchObserver | None = None,
                 lanes: int = 1):
        self._run = run
        self._observe = observe
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.lanes = max(1, lanes)
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._free: asyncio.Semaphore | None = None  # model threads without a batch
        self._running: dict[asyncio.Task, int] = {}  # batches on the model threads: their images
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0  # model calls so far
        self.images = 0  # images run so far

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Images waiting for the model."""
        return 0 if self._queue is None else self._queue.qsize()

    def call_blocking(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a model thread between its batches and return its result; called from another thread (never
        the event loop's), so that other work on the model (e.g. embedding gallery references) takes its turn."""
        if not self.running or self._executor is None:
            raise RuntimeError("the batcher is not running")
        return self._executor.submit(fn).result()

    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._free = asyncio.Semaphore(self.lanes)
        self._executor = ThreadPoolExecutor(self.lanes, thread_name_prefix="model")
        self._task = asyncio.create_task(self._serve(), name="batcher")

    async def stop(self) -> None:
        """Stop batching; batches on the model threads are answered, images still waiting are cancelled."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._running, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, key: Hashable, images: Sequence[Image.Image]) -> list[Any]:
        """The results for ``images`` (in order), run in batches with the images of other requests."""
        if not self.running or self._queue is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        items = [_Item(key, image, loop.create_future()) for image in images]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _serve(self) -> None:
        assert self._queue is not None and self._free is not None
        while True:
            await self._free.acquire()
            batch = [await self._queue.get()]
            await self._fill(batch)
            task = asyncio.create_task(self._run_batch(batch))
            self._running[task] = len(batch)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        """A model thread is free again."""
        del self._running[task]
        assert self._free is not None
        self._free.release()

    def _size(self, batch: list[_Item]) -> int:
        """The images ``batch`` takes: ``max_batch`` with one lane, else its lane's share of the batcher's images."""
        assert self._queue is not None
        if self.lanes == 1:
            return self.max_batch
        images = len(batch) + self._queue.qsize() + sum(self._running.values())
        return min(self.max_batch, -(-images // self.lanes))

    async def _fill(self, batch: list[_Item]) -> None:
        """Add waiting images up to the batch's :meth:`_size`; with one lane, also those submitted until ``max_wait_s``
        after the first one."""
        assert self._queue is not None
        deadline = asyncio.get_running_loop().time() + (self.max_wait_s if self.lanes == 1 else 0.0)
        while len(batch) < self._size(batch):
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                return

    async def _run_batch(self, batch: list[_Item]) -> None:
        """Run each key's images in one call; hand each request its results or the error."""
        groups: dict[Hashable, list[_Item]] = defaultdict(list)
        for item in batch:
            if not item.future.done():  # a request whose client went away is not computed
                groups[item.key].append(item)
        loop = asyncio.get_running_loop()
        for key, items in groups.items():
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run, key, [i.image for i in items])
            except Exception as err:  # the error goes to the requests of this group; the service keeps serving
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            finally:
                self.batches += 1
                self.images += len(items)
                if self._observe is not None:
                    self._observe(key, len(items), time.perf_counter() - start)
            for item, result in zip(items, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
