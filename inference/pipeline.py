"""Work items computed on a few threads at once, results in input order: the lanes of a CPU engine.

Torch-free (the ONNX path uses it). PIL's decoding and resampling, numpy and onnxruntime release the GIL, so
threads that each carry a whole batch overlap one batch's decoding with another's model call.
"""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, name: str = "lane") -> Iterator[R]:
    """``fn(item)`` for each of ``items``, in order, computed by ``workers`` threads (0 or 1: here, one after the
    other). At most ``workers + 1`` items are in flight, so memory does not grow with the number of items. An
    exception of ``fn`` is raised where its item's result would be yielded; the items after it are cancelled (or
    waited for when already running) before it propagates, as when the caller stops early."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
