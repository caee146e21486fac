"""Request limits and upload checks: bad input becomes a 4xx JSON error naming the file, never a crash.

The files per request and the size of a body without a Content-Length are FastAPI's own limits (``form_limits``,
``max_body_size``, set on the ``/v1`` router); this module adds the bound on requests in progress, the JSON answer to
an over-long Content-Length and the decoding of each upload.
"""

import asyncio
import io
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated

from fastapi import File, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from data import ImageLoadError, load_image

LIMITED_PREFIX = "/v1/"  # POST requests under this prefix count as inference requests
Uploads = Annotated[list[UploadFile], File(description="one or more images (multipart field 'files')")]


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status``, a one-line ``message`` and the ``file`` it is about."""

    def __init__(self, status: int, message: str, file: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.file = file
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "file": self.file}, self.status, self.headers)


def upload_too_large(limit_mb: float) -> ServiceError:
    return ServiceError(413, f"the upload is over the {limit_mb:g} MB limit of one request (--max-upload-mb); "
                             "send fewer or smaller images per request")


@dataclass
class InFlight:
    """The inference requests in progress (queued for the model or running) and their bound."""

    limit: int
    count: int = 0


class RequestLimits:
    """ASGI middleware for ``POST /v1/...``: at most ``in_flight.limit`` such requests in the service at once (429
    beyond), and a JSON 413 for a Content-Length over ``max_bytes``, both before the body is read. (FastAPI's
    ``max_body_size`` stops a longer body without a Content-Length while it is read; for one with an over-long
    Content-Length Starlette would answer in plain text.)"""

    def __init__(self, app: ASGIApp, in_flight: InFlight, max_bytes: int, max_mb: float):
        self.app = app
        self.in_flight = in_flight
        self.max_bytes = max_bytes
        self.max_mb = max_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(LIMITED_PREFIX):
            await self.app(scope, receive, send)
            return
        in_flight = self.in_flight
        length = Headers(scope=scope).get("content-length", "")
        if in_flight.count >= in_flight.limit:
            error = ServiceError(429, f"the service is busy ({in_flight.count} requests in progress, --max-queue "
                                      f"{in_flight.limit}); retry shortly", headers={"Retry-After": "1"})
        elif length.isdigit() and int(length) > self.max_bytes:
            error = upload_too_large(self.max_mb)
        else:
            in_flight.count += 1
            try:
                await self.app(scope, receive, send)
            finally:
                in_flight.count -= 1
            return
        await error.response()(scope, receive, send)


def decode_upload(name: str, data: bytes) -> Image.Image:
    """One upload decoded by the project's image loader, or the ServiceError naming the file and the reason."""
    if not data:
        raise ServiceError(422, f"{name}: empty file: 0 bytes; upload an image file", name)
    try:
        return load_image(io.BytesIO(data))
    except ImageLoadError as err:
        if err.reason.startswith("too large"):
            raise ServiceError(413, f"{name}: {err.reason.rstrip('.')}; upload a smaller image", name) from None
        raise ServiceError(422, f"{name}: {err.reason.rstrip('.')}; upload a JPEG, PNG, WebP, ... image",
                           name) from None


@dataclass(frozen=True)
class Upload:
    """One decoded upload: its name, its bytes and its image."""

    name: str
    data: bytes
    image: Image.Image


async def read_uploads(files: Sequence[UploadFile], pool: Executor) -> list[Upload]:
    """The uploads, decoded on ``pool`` threads (off the event loop); the first bad one raises its ServiceError."""
    names = [file.filename or f"file {index + 1}" for index, file in enumerate(files)]
    contents = [await file.read() for file in files]
    loop = asyncio.get_running_loop()
    decoded = await asyncio.gather(*(loop.run_in_executor(pool, decode_upload, name, data)
                                     for name, data in zip(names, contents, strict=True)), return_exceptions=True)
    for result in decoded:
        if isinstance(result, BaseException):
            raise result
    return [Upload(name, data, image) for name, data, image in zip(names, contents, decoded, strict=True)]
