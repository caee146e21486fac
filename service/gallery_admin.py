"""Every change the service makes to a stored gallery: enroll an artist, add references to one, remove one.

The only module of the service that writes galleries (:mod:`retrieval.store` decides where they live). Uploaded
references are kept as files in ``<gallery>.references/<artist>/``, next to the gallery folder or Milvus Lite file
(:func:`retrieval.store.references_folder`; a gallery on a Milvus server is changed with the tools): the layout
``tools/build_gallery.py --images`` reads. They are embedded by the function build_gallery embeds with
(:func:`retrieval.references.embed_images`) and appended with ``extended``, as ``build_gallery.py --add``
does, so the stored gallery equals ``build_gallery.py --images <gallery>.references --add`` run on the gallery as
it was.

A change builds a new gallery object (the served one is never modified), saves it (:func:`retrieval.store.save_gallery`:
a folder atomically, a Milvus collection in place, so searches of the served gallery may see the change a moment
before the swap) and only then returns it for the service to swap in. A failed change removes the reference files it
stored. The caller serializes changes (one at a time).
"""

import hashlib
import io
import os
import re
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from data import IMAGE_EXTENSIONS
from predictor import BatchedModel
from retrieval.gallery import GALLERY_FILE, BaseGallery
from retrieval.references import artist_of, embed_images
from retrieval.store import gallery_identity, is_milvus_uri, open_gallery, references_folder, save_gallery
from service.limits import ServiceError, Upload

T = TypeVar("T")
OnModelThread = Callable[[Callable[[], T]], T]  # runs a function on the model thread and returns its result
MAX_NAME_CHARS = 100
FORBIDDEN_CHARS = set('/\\:*?"<>|')  # path separators and what Windows file names cannot hold


def check_artist_name(name: str) -> str:
    """``name`` when it can name an artist folder; a 422 saying what is wrong otherwise."""
    if not name.strip():
        problem = "is empty"
    elif name != name.strip():
        problem = "starts or ends with spaces"
    elif len(name) > MAX_NAME_CHARS:
        problem = f"is longer than {MAX_NAME_CHARS} characters"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif any(c in FORBIDDEN_CHARS or unicodedata.category(c).startswith("C") for c in name):
        problem = "holds one of / \\ : * ? \" < > | or a control character"
    else:
        return name
    raise ServiceError(422, f"the artist name {name!r} {problem}; use letters, digits, spaces and - _ . , ' ( )")


def list_artists(gallery: BaseGallery) -> list[dict[str, Any]]:
    """Per enrolled artist (sorted): reference count and the threshold :meth:`BaseGallery.unknown` applies."""
    counts = gallery.image_counts()
    return [artist_entry(gallery, name, counts[name]) for name in gallery.artist_names]


def artist_entry(gallery: BaseGallery, artist: str, references: int | None = None) -> dict[str, Any]:
    """``{"artist", "references", "threshold", "calibrated"}``: its own calibrated threshold, else the gallery's."""
    own = gallery.artist_thresholds or {}
    return {"artist": artist,
            "references": gallery.image_counts()[artist] if references is None else references,
            "threshold": own.get(artist, gallery.unknown_threshold), "calibrated": artist in own}


def _suffix(upload: Upload) -> str:
    """The upload's image extension, or one for its format (what build_gallery's folder listing looks for)."""
    suffix = os.path.splitext(upload.name)[1].lower()
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    with Image.open(io.BytesIO(upload.data)) as image:
        kind = image.format
    known = [ext for ext, fmt in Image.registered_extensions().items() if fmt == kind and ext in IMAGE_EXTENSIONS]
    if not known:
        raise ServiceError(422, f"{upload.name}: {kind} images cannot be kept as gallery references; upload a JPEG, "
                                "PNG, WebP, ... image", upload.name)
    return min(known, key=IMAGE_EXTENSIONS.index)


def stored_name(upload: Upload) -> str:
    """A safe file name for an upload: its base name with other characters than letters, digits, ``-_. `` made
    ``_``, and an image extension."""
    base = re.split(r"[/\\]", upload.name)[-1]
    stem = re.sub(r"[^\w\-. ]", "_", os.path.splitext(base)[0]).strip(" .")[:80] or "image"
    return stem + _suffix(upload)


class GalleryStore:
    """A gallery (folder or Milvus location) the service changes, and the reference files it stored for it.

    It remembers the SHA-256 of ``gallery.json`` (a Milvus gallery's revision) as loaded or last written: a change is
    refused (409) when another program wrote the gallery since, instead of overwriting that program's work.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.references = references_folder(path)  # None: nowhere to keep uploads (a Milvus server)
        self._fingerprint = self._read_fingerprint()  # before loading: a write in between is caught, not lost

    def _read_fingerprint(self) -> str | None:
        if is_milvus_uri(self.path):
            return str(gallery_identity(self.path)["revision"])
        try:
            return hashlib.sha256((Path(self.path) / GALLERY_FILE).read_bytes()).hexdigest()
        except OSError:
            return None

    def load(self, model: BatchedModel) -> BaseGallery:
        """The stored gallery, refused when it was built with another model (``model`` gets its style vector)."""
        gallery = open_gallery(self.path)
        gallery.check_model(model, self.path)
        return gallery

    def enroll(self, gallery: BaseGallery, artist: str, uploads: list[Upload], model: BatchedModel,
               on_model_thread: OnModelThread, batch_size: int) -> BaseGallery:
        """``gallery`` with a new artist made of ``uploads`` (409 when the name is enrolled already)."""
        check_artist_name(artist)
        if artist in gallery.artist_names:
            raise ServiceError(409, f"artist {artist!r} is enrolled already; add images to it with POST "
                                    "/v1/gallery/artists/{artist}/references, or pick another name")
        return self._add(gallery, artist, uploads, model, on_model_thread, batch_size)

    def add_references(self, gallery: BaseGallery, artist: str, uploads: list[Upload], model: BatchedModel,
                       on_model_thread: OnModelThread, batch_size: int) -> BaseGallery:
        """``gallery`` with ``uploads`` added to an enrolled artist's references (404 for another name)."""
        self._check_enrolled(gallery, artist)
        return self._add(gallery, artist, uploads, model, on_model_thread, batch_size)

    def remove(self, gallery: BaseGallery, artist: str) -> BaseGallery:
        """``gallery`` without ``artist``; the reference files the service stored for it are deleted too."""
        self._check_enrolled(gallery, artist)
        if len(gallery.artist_names) == 1:
            raise ServiceError(409, f"{artist!r} is the only artist in the gallery; enroll another one first")
        self._check_unchanged()
        smaller = gallery.removed(artist)
        self._save(smaller)
        folder = self.references / artist
        if folder.resolve().parent == self.references.resolve():  # its own folder, never a path elsewhere
            shutil.rmtree(folder, ignore_errors=True)
        return smaller

    @staticmethod
    def _check_enrolled(gallery: BaseGallery, artist: str) -> None:
        if artist not in gallery.artist_names:
            raise ServiceError(404, f"artist {artist!r} is not in the gallery; GET /v1/gallery/artists lists them")

    def _check_unchanged(self) -> None:
        if self.references is None:
            raise ServiceError(409, f"gallery {self.path} is on a Milvus server, where the service has no folder for "
                                    "uploaded references; change it with tools/build_gallery.py, then POST "
                                    "/v1/admin/reload")
        if self._read_fingerprint() != self._fingerprint:
            raise ServiceError(409, f"gallery {self.path} changed on disk since the service loaded it (another "
                                    "program wrote it); reload it (POST /v1/admin/reload or SIGHUP), then retry")

    def _add(self, gallery: BaseGallery, artist: str, uploads: list[Upload], model: BatchedModel,
             on_model_thread: OnModelThread, batch_size: int) -> BaseGallery:
        """The references stored, embedded as build_gallery does, appended and saved; undone on any failure."""
        self._check_unchanged()
        names = self._store(artist, uploads)
        try:
            kept, vectors = on_model_thread(lambda: embed_images(model, self.references, names, batch_size))
            if len(kept) != len(names):
                raise ServiceError(422, f"{len(names) - len(kept)} of the uploads could not be read back from "
                                        f"{self.references}; check that folder, then retry")
            root = str(self.references)
            larger = gallery.extended(vectors, [artist_of(name, root) for name in kept],
                                      [os.path.abspath(os.path.join(root, name)) for name in kept])
            self._save(larger)
        except BaseException:
            self._unstore(names)
            raise
        return larger

    def _store(self, artist: str, uploads: list[Upload]) -> list[str]:
        """Write the uploads' bytes into ``references/artist/``; their names relative to ``references``."""
        folder = self.references / artist
        names: list[str] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for upload in uploads:
                stem, suffix = os.path.splitext(stored_name(upload))
                target, number = folder / f"{stem}{suffix}", 1
                while target.exists():
                    target, number = folder / f"{stem}-{number}{suffix}", number + 1
                with open(target, "xb") as f:  # never overwrites
                    names.append(f"{artist}/{target.name}")
                    f.write(upload.data)
        except OSError as err:
            self._unstore(names)
            raise ServiceError(500, f"cannot store the references in {folder} ({err.strerror or err}); make that "
                                    "folder writable, then retry") from None
        except BaseException:
            self._unstore(names)
            raise
        return names

    def _unstore(self, names: list[str]) -> None:
        for name in names:
            (self.references / name).unlink(missing_ok=True)
        for folder in {(self.references / name).parent for name in names}:
            try:
                folder.rmdir()  # only when empty: the artist's earlier references stay
            except OSError:
                pass

    def _save(self, gallery: BaseGallery) -> None:
        """Compute what serving needs (prototypes, index) and store the gallery."""
        np.asarray(gallery.prototypes)
        gallery.index_parameters()
        save_gallery(gallery, self.path)
        self._fingerprint = self._read_fingerprint()
