"""The service's limits and options, checked once at start-up."""

import ipaddress
from dataclasses import dataclass

from PIL import Image

from utils import UserError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb limit


@dataclass(frozen=True)
class Settings:
    """Batching, limits and access options of one service.

    ``max_upload_mb`` bounds a whole request body, ``max_files`` the images of one request, ``max_pixels`` the
    width x height of one image (the image loader refuses larger ones as decompression bombs; it is Pillow's
    process-wide ``MAX_IMAGE_PIXELS`` while the app runs) and ``max_queue`` the
    inference requests in the service at once (queued or running; more get 429). ``api_key`` set: every ``/v1``
    route needs ``Authorization: Bearer <key>``. ``cors_origins``: origins allowed to call the API from a browser.
    ``host``: the address the service listens on; without an API key, gallery changes and reloads are refused unless
    it is a loopback address. ``metrics``: serve ``GET /metrics`` (Prometheus).
    """

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_upload_mb: float = 20.0
    max_files: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_queue: int = 64
    decode_threads: int = 2
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    metrics: bool = True

    def __post_init__(self) -> None:
        for flag, value, minimum in (("--max-batch", self.max_batch, 1), ("--max-files", self.max_files, 1),
                                     ("--max-queue", self.max_queue, 1), ("--num-workers", self.decode_threads, 1),
                                     ("--max-pixels", self.max_pixels, 1), ("--max-wait-ms", self.max_wait_ms, 0),
                                     ("--max-upload-mb", self.max_upload_mb, 0.001)):
            if value < minimum:
                raise UserError(f"{flag} must be at least {minimum}, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty; pass a non-empty --api-key or leave it out")

    @property
    def local_only(self) -> bool:
        """The service listens on a loopback address only (this machine)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name other than localhost
            return False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
