"""Where a gallery lives: a folder (the default, :mod:`retrieval.gallery`) or a Milvus collection
(:mod:`retrieval.milvus_gallery`). This module alone decides which, from the location, so every tool opens, builds,
saves and copies galleries the same way on both.

A Milvus location is ``URI[#NAME]``: ``URI`` a path ending in ``.db`` (Milvus Lite, embedded, no server) or
``http://host:19530`` / ``https://...`` (a Milvus server); ``NAME`` the gallery's collection (default ``gallery``).
Anything else is a folder.
"""

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from artifacts.work_folder import file_identity, work_folder_for
from errors import import_optional
from retrieval import gallery as folders
from retrieval.gallery import BaseGallery, Gallery
from retrieval.index import BLOCK_ROWS, EXACT_LIMIT, INDEX_MEMORY_GIB, l2_normalize, read_block
from utils import UserError

MILVUS_REQUIREMENTS = "requirements-milvus.txt"
DEFAULT_COLLECTION = "gallery"
SERVER_SCHEMES = ("http://", "https://")

Blocks = Iterator[tuple[np.ndarray, list[str], list[str]]]  # (unit vectors, artists, paths) of consecutive rows


def is_milvus_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a Milvus collection (a ``.db`` file or an http(s) URI) rather than a folder."""
    text = str(location)
    return text.startswith(SERVER_SCHEMES) or text.split("#", 1)[0].endswith(".db")


def is_server(uri: str) -> bool:
    """Whether a Milvus ``uri`` is a server (else a Milvus Lite file)."""
    return uri.startswith(SERVER_SCHEMES)


def split_location(location: str | os.PathLike) -> tuple[str, str]:
    """``(uri, collection)`` of a Milvus location; a Milvus Lite path is made absolute."""
    uri, _, name = str(location).partition("#")
    return (uri if is_server(uri) else os.path.abspath(uri)), name or DEFAULT_COLLECTION


def _milvus() -> ModuleType:
    return import_optional("retrieval.milvus_gallery", MILVUS_REQUIREMENTS, "a Milvus gallery")


def gallery_exists(location: str | os.PathLike) -> bool:
    """Whether ``location`` holds a gallery (a Milvus server that cannot be reached is a one-line error)."""
    if is_milvus_uri(location):
        return _milvus().exists(str(location))
    return (Path(location) / folders.GALLERY_FILE).is_file()


def open_gallery(location: str | os.PathLike) -> BaseGallery:
    """The gallery at ``location``, checked; a problem is a one-line :class:`UserError`."""
    if is_milvus_uri(location):
        return _milvus().open_milvus_gallery(str(location))
    return folders.load_gallery(location)


def save_gallery(gallery: BaseGallery, location: str | os.PathLike, replace: bool = False) -> None:
    """Store ``gallery`` at ``location``: its changes where it was loaded from, else a new gallery there (an existing
    Milvus collection only with ``replace``; an existing gallery folder is replaced atomically)."""
    if is_milvus_uri(location):
        _milvus().store(gallery, str(location), replace)
    elif isinstance(gallery, Gallery):
        folders.save_gallery(gallery, location)
    else:
        _export_to_folder(gallery, Path(location))


def copy_gallery(source: str | os.PathLike, target: str | os.PathLike, replace: bool = False) -> BaseGallery:
    """Copy the gallery at ``source`` to ``target`` (either a folder or a Milvus location), block by block."""
    gallery = open_gallery(source)
    if str(source) == str(target):
        raise UserError(f"{source} is both the source and the target; pass another target")
    save_gallery(gallery, target, replace)
    return open_gallery(target)


def _export_to_folder(gallery: BaseGallery, out: Path) -> None:
    """A gallery folder with ``gallery``'s references (in their order), thresholds and calibration: the vectors are
    streamed into a temporary ``.npy`` beside ``out`` and built from there as ``--features`` builds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    artists: list[str] = []
    paths: list[str] = []

    def vectors() -> Iterator[np.ndarray]:
        for block, block_artists, block_paths in gallery.blocks():
            artists.extend(block_artists)
            paths.extend(block_paths)
            yield block

    handle, temporary = tempfile.mkstemp(suffix=".npy", prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        folders.save_rows(Path(temporary), vectors(), gallery.size, gallery.dim)
        copy = folders.build_from_features(temporary, artists, paths, dict(gallery.model), out, gallery.exact_limit)
    finally:
        Path(temporary).unlink(missing_ok=True)
    copy.unknown_threshold, copy.artist_thresholds = gallery.unknown_threshold, gallery.artist_thresholds
    copy.calibration = gallery.calibration
    folders.save_gallery(copy, out)


def feature_blocks(features: np.ndarray, artists: list[str], paths: list[str]) -> Blocks:
    """``(unit vectors, artists, paths)`` of a features array, ``BLOCK_ROWS`` rows at a time."""
    for start in range(0, len(features), BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, len(features))
        yield (l2_normalize(read_block(features, start, stop), "feature row", start), artists[start:stop],
               paths[start:stop])


def build_from_features(features: str | os.PathLike, artists: list[str], paths: list[str], model: dict[str, Any],
                        location: str | os.PathLike, exact_limit: int = EXACT_LIMIT,
                        index_memory_gib: float = INDEX_MEMORY_GIB) -> BaseGallery:
    """A new gallery at ``location`` from a features ``.npy`` (:func:`retrieval.gallery.build_from_features` for a
    folder; streamed into a new collection for Milvus)."""
    if not is_milvus_uri(location):
        return folders.build_from_features(features, artists, paths, model, location, exact_limit, index_memory_gib)
    source = folders.open_features(features, len(artists), model)
    milvus = _milvus()
    return milvus.create(str(location), model, source.shape[1], sorted(set(artists)),
                         feature_blocks(source, artists, paths), len(artists), exact_limit)


def gallery_identity(location: str | os.PathLike) -> dict[str, Any]:
    """What changes when the gallery at ``location`` changes: its files, or its Milvus revision."""
    if is_milvus_uri(location):
        return {"uri": str(location), "revision": _milvus().revision(str(location))}
    return file_identity(location)


def references_folder(location: str | os.PathLike) -> Path | None:
    """The folder beside a gallery where the service keeps uploaded references: ``<folder>.references``, or
    ``<file>.<collection>.references`` beside a Milvus Lite file; None for a Milvus server (no place beside it)."""
    if not is_milvus_uri(location):
        path = Path(location)
        return path.parent / f"{path.name}.references"
    uri, name = split_location(location)
    if is_server(uri):
        return None
    return Path(uri).parent / f"{Path(uri).stem}.{name}.references"



def work_folder(location: str | os.PathLike) -> Path:
    """Where a run building the gallery at ``location`` keeps its embeddings for ``--resume``: beside a folder or a
    Milvus Lite file, in the current folder for a Milvus server."""
    if not is_milvus_uri(location):
        return work_folder_for(location)
    uri, name = split_location(location)
    if is_server(uri):
        return work_folder_for(re.sub(r"[^\w.-]+", "_", f"{uri}_{name}"))
    return work_folder_for(Path(uri).with_name(f"{Path(uri).stem}.{name}"))
