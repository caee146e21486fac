"""``/v1`` routes that change what is served: the gallery's artists (list, enroll, add references, remove) and
reloads. Writes need the API key when the service has one, and are refused when it has none but listens beyond this
machine."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Form, Path, Query

from service.gallery_admin import artist_entry, check_artist_name, list_artists
from service.limits import ServiceError, Uploads
from service.runtime import Runtime, Service
from service.schemas import ArtistChange, ArtistList, ArtistRemoved, ModelInfo, ReloadRequest
from service.settings import Settings

ArtistName = Annotated[str, Path(description="the artist's name (URL-encoded)")]


def writes_guard(settings: Settings) -> list:
    """The dependency refusing changes (403) of a service without an API key that others can reach."""

    async def writes_allowed() -> None:
        if settings.api_key is None and not settings.local_only:
            raise ServiceError(403, f"gallery changes and reloads are refused: the service listens on {settings.host} "
                                    "without an API key; restart it with --api-key (or ARTIST_API_KEY), or on "
                                    "127.0.0.1")

    return [Depends(writes_allowed)]


def add_admin_routes(router: APIRouter, service: Service, settings: Settings, Current: Any) -> None:  # noqa: N803
    """The gallery's artists (``/v1/gallery/artists``) and ``POST /v1/admin/reload`` on ``router``."""
    guard = writes_guard(settings)
    def changed(runtime: Runtime, artist: str, added: int) -> dict[str, Any]:
        assert runtime.search is not None
        return {**artist_entry(runtime.search.gallery, artist), "added": added,
                "gallery": runtime.search.info(per_artist=False)}

    @router.get("/gallery/artists", response_model=ArtistList)
    async def artists(runtime: Current, offset: Annotated[int, Query(ge=0)] = 0,
                      limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> dict[str, Any]:
        """The enrolled artists, sorted by name: reference count and unknown threshold of each."""
        if runtime.search is None:
            raise ServiceError(404, "no gallery is loaded; start serve.py with --gallery GALLERY")
        gallery = runtime.search.gallery
        return {"total": len(gallery.artist_names), "unknown_threshold": gallery.unknown_threshold,
                "artists": list_artists(gallery)[offset:offset + limit]}

    @router.post("/gallery/artists", response_model=ArtistChange, status_code=201, dependencies=guard)
    async def enroll(artist: Annotated[str, Form(description="the new artist's name")], files: Uploads,
                     runtime: Current) -> dict[str, Any]:
        """Enroll a new artist from reference images, embedded with the served model; answers its threshold."""
        uploads = await runtime.engine.uploads(files)
        _, new = await service.change_gallery("enroll", lambda rt, gallery, store: store.enroll(
            gallery, check_artist_name(artist), uploads, rt.engine.model, rt.engine.on_model_thread,
            settings.max_batch))
        return changed(new, artist, len(uploads))

    @router.post("/gallery/artists/{artist}/references", response_model=ArtistChange, dependencies=guard)
    async def add_references(artist: ArtistName, files: Uploads, runtime: Current) -> dict[str, Any]:
        """Add reference images to an enrolled artist."""
        uploads = await runtime.engine.uploads(files)
        _, new = await service.change_gallery("add", lambda rt, gallery, store: store.add_references(
            gallery, artist, uploads, rt.engine.model, rt.engine.on_model_thread, settings.max_batch))
        return changed(new, artist, len(uploads))

    @router.delete("/gallery/artists/{artist}", response_model=ArtistRemoved, dependencies=guard)
    async def remove(artist: ArtistName) -> dict[str, Any]:
        """Remove an artist and its references from the gallery."""
        old, new = await service.change_gallery("remove", lambda rt, gallery, store: store.remove(gallery, artist))
        assert old.search is not None and new.search is not None
        removed = old.search.gallery.size - new.search.gallery.size
        return {"artist": artist, "removed": removed, "gallery": new.search.info(per_artist=False)}

    @router.post("/admin/reload", response_model=ModelInfo, dependencies=guard)
    async def reload(paths: Annotated[ReloadRequest | None, Body()] = None) -> dict[str, Any]:
        """Load the model folder and gallery again (or the paths given) and serve them once ready; until then, and
        when loading fails, the current ones answer."""
        paths = paths or ReloadRequest()
        return (await service.reload(paths.checkpoint, paths.gallery)).info()

