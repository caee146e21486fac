"""The FastAPI app: the ``/v1`` API, health checks and the page at ``/``."""

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from predictor import BatchedModel
from retrieval.gallery import BaseGallery
from service.admin import add_admin_routes
from service.auth import api_key_dependencies
from service.engine import Engine
from service.gallery_admin import GalleryStore
from service.limits import InFlight, RequestLimits, ServiceError, Uploads, upload_too_large
from service.metrics import Metrics, RequestMetrics
from service.runtime import Runtime, Service, Source, now
from service.schemas import ClassifyResponse, ErrorBody, FeaturesResponse, Health, ModelInfo, SimilarResponse
from service.settings import Settings
from service.similar import GallerySearch

STATIC_DIR = Path(__file__).parent / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "more files than --max-files in one request"), (401, "missing or wrong API key"),
        (403, "a gallery change or reload on a service without an API key that listens beyond this machine"),
        (404, "no gallery is loaded, or no such gallery image or artist"),
        (409, "the artist is enrolled already, or the gallery changed on disk since it was loaded"),
        (413, "request body or image too large"),
        (422, "an upload is not a readable image, or a parameter is invalid"), (429, "too many requests in progress"),
        (500, "the model failed on the batch, or the references could not be stored"))
}


def holding(service: Service) -> Callable[[], AsyncIterator[Runtime]]:
    """The dependency giving a request the current runtime, held until it is answered."""

    async def current() -> AsyncIterator[Runtime]:
        async with service.use() as runtime:
            yield runtime

    return current


def api_router(service: Service, settings: Settings) -> APIRouter:
    """``/v1``: the model's answers and the gallery's management, behind the API key when there is one; body and
    file-count limits."""
    router = APIRouter(prefix="/v1", dependencies=api_key_dependencies(settings.api_key), responses=ERRORS,
                       max_body_size=settings.max_upload_bytes, form_limits={"max_files": settings.max_files})
    Current = Annotated[Runtime, Depends(holding(service))]  # noqa: N806 (a type)

    @router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(files: Uploads, runtime: Current, top_k: Annotated[int, Query(ge=1, le=10000)] = 5,
                       threshold: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0) -> dict[str, Any]:
        """Top-k artists of each image (multi-label models: labels with confidences and normalised ratios)."""
        engine = runtime.engine
        results = await engine.classify(files, top_k, threshold)
        return {"model": engine.model.model_name or "", "multi_label": engine.multi_label, "results": results}

    @router.post("/features", response_model=FeaturesResponse)
    async def features(files: Uploads, runtime: Current) -> dict[str, Any]:
        """The style vector of each image (for clustering or similarity search)."""
        engine = runtime.engine
        return {"model": engine.model.model_name or "", "feature_dim": engine.model.feature_dim,
                "results": await engine.features(files)}

    @router.get("/model", response_model=ModelInfo)
    async def model_info(runtime: Current) -> dict[str, Any]:
        """Architecture, classes, input size, version (checkpoint hash, load time, reloads) and limits of the
        served model, and its gallery."""
        return runtime.info()

    _add_gallery_routes(router, Current)
    add_admin_routes(router, service, settings, Current)
    return router


def loaded(runtime: Runtime) -> GallerySearch:
    """The runtime's gallery search (404 while no gallery is loaded)."""
    if runtime.search is None:
        raise ServiceError(404, "no gallery is loaded; start serve.py with --gallery GALLERY "
                                "(tools/build_gallery.py makes one)")
    return runtime.search


def _add_gallery_routes(router: APIRouter, Current: Any) -> None:  # noqa: N803 (a type)
    """``POST /v1/similar`` and the thumbnails of the gallery's works (404 while no gallery is loaded)."""

    @router.post("/similar", response_model=SimilarResponse)
    async def similar(files: Uploads, runtime: Current, top_k: Annotated[int, Query(ge=1, le=1000)] = 10,
                      top_artists: Annotated[int, Query(ge=1, le=1000)] = 5) -> dict[str, Any]:
        """The gallery's nearest works and closest artists of each image (cosine of L2-normalised style vectors);
        ``unknown`` when the best artist score is below that artist's calibrated threshold."""
        search = loaded(runtime)
        names, rows = await runtime.engine.feature_rows(files)
        matches = search.similar(np.stack(rows), top_k, top_artists)
        return {"model": runtime.engine.model.model_name or "", **search.gallery.thresholds(),
                "results": [{"file": name, **match} for name, match in zip(names, matches, strict=True)]}

    @router.get("/gallery/images/{image_id}", response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}})
    async def gallery_image(image_id: int, runtime: Current) -> Response:
        """The JPEG thumbnail of gallery work ``image_id`` (its index in the gallery's image list)."""
        return Response(loaded(runtime).thumbnail(image_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Every error is ``{"error": "...", "file": ...}`` with one line saying what is wrong and what to do."""

    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 413:  # FastAPI's body limit
            return upload_too_large(settings.max_upload_mb).response()
        return ServiceError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors())
        return ServiceError(422, f"invalid request ({problems}); see /docs").response()

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return ServiceError(500, f"internal error ({type(exc).__name__}: {exc}); see the service's log").response()

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def create_app(model: BatchedModel, settings: Settings | None = None, gallery: BaseGallery | None = None,
               source: Source | None = None) -> FastAPI:
    """The service for a loaded model. ``gallery``: the retrieval gallery behind ``POST /v1/similar``; a gallery of
    another model is refused (:class:`UserError`), and the model computes the gallery's style vector from now on.
    ``source``: where ``model`` and ``gallery`` were loaded from (:meth:`Source.load`): needed to reload them and to
    change the gallery (its folder)."""
    settings = settings or Settings()
    if gallery is not None:
        gallery.check_model(model, "given to create_app")
    metrics = Metrics()
    store = GalleryStore(source.gallery) if source is not None and source.gallery and gallery is not None else None
    search = GallerySearch(gallery) if gallery is not None else None
    runtime = Runtime(Engine(model, settings, metrics.observe_batch), search, store, source, now())
    service = Service(runtime, settings, metrics)
    app = FastAPI(title="Artist style recognition", lifespan=service.lifespan,
                  description="Classify images by artist, extract style vectors and find similar works with one "
                              "loaded model; manage its artist gallery. Upload images as multipart field `files`.")
    app.state.service = service
    in_flight = InFlight(settings.max_queue)
    app.add_middleware(RequestLimits, in_flight=in_flight, max_bytes=settings.max_upload_bytes,
                       max_mb=settings.max_upload_mb)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization"])
    _add_error_handlers(app, settings)
    router = api_router(service, settings)
    app.include_router(router)
    _add_health_routes(app, service, in_flight)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.metrics:
        _add_metrics(app, service, in_flight, settings, [*router.routes])
    return app


def _add_health_routes(app: FastAPI, service: Service, in_flight: InFlight) -> None:
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, Any]:
        """The process is up; requests in progress and the model calls so far (of the model served now)."""
        batcher = service.current.engine.batcher
        return {"status": "ok", "in_flight": in_flight.count, "batches": batcher.batches, "images": batcher.images}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}})
    async def readyz() -> dict[str, str]:
        """Ready to answer: the model is loaded and its batcher runs (503 otherwise)."""
        if not service.current.engine.batcher.running:
            raise ServiceError(503, "the model's batcher is not running; restart the service")
        return {"status": "ready"}


def _add_metrics(app: FastAPI, service: Service, in_flight: InFlight, settings: Settings,
                 included: list[BaseRoute]) -> None:
    """``GET /metrics`` (behind the API key when there is one) and the request counts behind it (by the route
    templates of the app and of its ``included`` routers)."""
    metrics = service.metrics

    def gallery_size(artists: bool) -> float:
        search = service.current.search
        if search is None:
            return 0
        return len(search.gallery.artist_names) if artists else search.gallery.size

    metrics.watch(queue_depth=lambda: service.current.engine.batcher.queued, requests_in_flight=lambda: in_flight.count,
                  gallery_artists=lambda: gallery_size(True), gallery_references=lambda: gallery_size(False))

    @app.get("/metrics", tags=["health"], response_class=Response, dependencies=api_key_dependencies(settings.api_key),
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        """Prometheus metrics (text format): requests and latency by route and status, model calls, queue depth,
        images processed, gallery size, reloads and gallery changes."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    routes = [*app.router.routes, *included]
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)  # outermost: sees every answer
