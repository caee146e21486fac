"""The FastAPI app: the ``/v1`` API, health checks and the page at ``/``."""

from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from predictor import BatchedModel
from retrieval.gallery import Gallery
from service.auth import api_key_dependencies
from service.engine import Engine
from service.limits import InFlight, RequestLimits, ServiceError, upload_too_large
from service.schemas import ClassifyResponse, ErrorBody, FeaturesResponse, Health, ModelInfo, SimilarResponse
from service.settings import Settings
from service.similar import GallerySearch

STATIC_DIR = Path(__file__).parent / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "more files than --max-files in one request"), (401, "missing or wrong API key"),
        (404, "no gallery is loaded, or no such gallery image"),
        (413, "request body or image too large"),
        (422, "an upload is not a readable image, or a parameter is invalid"), (429, "too many requests in progress"),
        (500, "the model failed on the batch"))
}
Uploads = Annotated[list[UploadFile], File(description="one or more images (multipart field 'files')")]


def api_router(engine: Engine, settings: Settings, gallery: GallerySearch | None) -> APIRouter:
    """``/v1``: the model's answers, behind the API key when there is one; body and file-count limits."""
    router = APIRouter(prefix="/v1", dependencies=api_key_dependencies(settings.api_key), responses=ERRORS,
                       max_body_size=settings.max_upload_bytes, form_limits={"max_files": settings.max_files})
    model_name = engine.model.model_name or ""

    @router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(files: Uploads, top_k: Annotated[int, Query(ge=1, le=10000)] = 5,
                       threshold: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0) -> dict[str, Any]:
        """Top-k artists of each image (multi-label models: labels with confidences and normalised ratios)."""
        results = await engine.classify(files, top_k, threshold)
        return {"model": model_name, "multi_label": engine.multi_label, "results": results}

    @router.post("/features", response_model=FeaturesResponse)
    async def features(files: Uploads) -> dict[str, Any]:
        """The style vector of each image (for clustering or similarity search)."""
        return {"model": model_name, "feature_dim": engine.model.feature_dim,
                "results": await engine.features(files)}

    @router.get("/model", response_model=ModelInfo)
    async def model_info() -> dict[str, Any]:
        """Architecture, classes, input size, version and limits of the loaded model."""
        return engine.info(gallery.info() if gallery is not None else None)

    _add_gallery_routes(router, engine, gallery)
    return router


def _add_gallery_routes(router: APIRouter, engine: Engine, gallery: GallerySearch | None) -> None:
    """``POST /v1/similar`` and the thumbnails of the gallery's works (404 while no gallery is loaded)."""

    def loaded() -> GallerySearch:
        if gallery is None:
            raise ServiceError(404, "no gallery is loaded; start serve.py with --gallery GALLERY "
                                    "(tools/build_gallery.py makes one)")
        return gallery

    @router.post("/similar", response_model=SimilarResponse)
    async def similar(files: Uploads, top_k: Annotated[int, Query(ge=1, le=1000)] = 10,
                      top_artists: Annotated[int, Query(ge=1, le=1000)] = 5) -> dict[str, Any]:
        """The gallery's nearest works and closest artists of each image (cosine of L2-normalised style vectors);
        ``unknown`` when the best artist score is below that artist's calibrated threshold."""
        search = loaded()
        names, rows = await engine.feature_rows(files)
        matches = search.similar(np.stack(rows), top_k, top_artists)
        return {"model": engine.model.model_name or "", **search.gallery.thresholds(),
                "results": [{"file": name, **match} for name, match in zip(names, matches, strict=True)]}

    @router.get("/gallery/images/{image_id}", response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}})
    async def gallery_image(image_id: int) -> Response:
        """The JPEG thumbnail of gallery work ``image_id`` (its index in the gallery's image list)."""
        return Response(loaded().thumbnail(image_id), media_type="image/jpeg",
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


def create_app(model: BatchedModel, settings: Settings | None = None, gallery: Gallery | None = None) -> FastAPI:
    """The service for a loaded model. ``gallery``: the retrieval gallery behind ``POST /v1/similar``; a gallery of
    another model is refused (:class:`UserError`), and the model computes the gallery's style vector from now on."""
    settings = settings or Settings()
    if gallery is not None:
        gallery.check_model(model, "given to create_app")
    engine = Engine(model, settings)
    app = FastAPI(title="Artist style recognition", lifespan=engine.lifespan,
                  description="Classify images by artist and extract style vectors with one loaded model. "
                              "Upload images as multipart field `files`.")
    app.state.engine = engine
    search = GallerySearch(gallery) if gallery is not None else None
    app.state.gallery = search
    in_flight = InFlight(settings.max_queue)
    app.add_middleware(RequestLimits, in_flight=in_flight, max_bytes=settings.max_upload_bytes,
                       max_mb=settings.max_upload_mb)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])
    _add_error_handlers(app, settings)
    app.include_router(api_router(engine, settings, search))

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, Any]:
        """The process is up; requests in progress and the model calls so far."""
        return {"status": "ok", "in_flight": in_flight.count, "batches": engine.batcher.batches,
                "images": engine.batcher.images}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}})
    async def readyz() -> dict[str, str]:
        """Ready to answer: the model is loaded and its batcher runs (503 otherwise)."""
        if not engine.batcher.running:
            raise ServiceError(503, "the model's batcher is not running; restart the service")
        return {"status": "ready"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
