"""Prometheus metrics of one service (``GET /metrics``, prometheus_client's text format).

Each app has its own registry, so several apps in one process (tests, embedding programs) keep their own counts.
Requests are counted by route template (``/v1/gallery/images/{image_id}``, not the id), method and status, so the
number of series stays bounded whatever clients send.
"""

import time
from collections.abc import Callable, Hashable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "artist_"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER_ROUTE = "other"  # paths that match no route (404s)


class Metrics:
    """The service's metrics; gauges are read when scraped (from the functions given to :meth:`watch`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        by_request = ["route", "method", "status"]
        self.requests = Counter(f"{PREFIX}http_requests", "HTTP requests answered", by_request, registry=registry)
        self.latency = Histogram(f"{PREFIX}http_request_duration_seconds", "time from request to the end of the answer",
                                 by_request, registry=registry)
        self.batch_size = Histogram(f"{PREFIX}model_batch_size", "images per model call", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.batch_seconds = Histogram(f"{PREFIX}model_batch_duration_seconds", "duration of one model call",
                                       ["kind"], registry=registry)
        self.images = Counter(f"{PREFIX}images_processed", "images run through the model", ["kind"],
                              registry=registry)
        self.gallery_writes = Counter(f"{PREFIX}gallery_writes", "gallery changes (enroll, add, remove)",
                                      ["operation", "result"], registry=registry)
        self.reloads = Counter(f"{PREFIX}reloads", "model and gallery reloads", ["result"], registry=registry)
        self._gauges = {name: Gauge(f"{PREFIX}{name}", text, registry=registry) for name, text in (
            ("queue_depth", "images waiting for the model"),
            ("requests_in_flight", "inference requests in progress (queued or running)"),
            ("gallery_artists", "artists in the served gallery (0 without one)"),
            ("gallery_references", "reference images in the served gallery (0 without one)"))}

    def watch(self, **readers: Callable[[], float]) -> None:
        """Read the gauges ``queue_depth``, ``requests_in_flight``, ``gallery_artists``, ``gallery_references``
        from these functions at each scrape."""
        for name, read in readers.items():
            self._gauges[name].set_function(read)

    def observe_batch(self, key: Hashable, size: int, seconds: float) -> None:
        """One model call of the batcher (its key starts with the computation: classify or cluster)."""
        kind = str(key[0]) if isinstance(key, tuple) else str(key)
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)
        self.images.labels(kind).inc(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route ``scope`` goes to (of one with another method for a 405; ``other`` when none
    matches). Routes without a ``path`` (FastAPI's included routers) are skipped: pass their routes too."""
    partial = OTHER_ROUTE
    for route in routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(path)
        if match == Match.PARTIAL and partial == OTHER_ROUTE:
            partial = str(path)
    return partial


class RequestMetrics:
    """ASGI middleware counting every HTTP request and timing it until its answer is sent, by route and status (an
    exception that escapes the app counts as 500)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, route = time.perf_counter(), ["500"], route_of(self.routes, scope)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = (route, scope["method"], status[0])
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
