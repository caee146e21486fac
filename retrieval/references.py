"""Labelled image folders (one sub-folder per artist) and query inputs turned into unit style vectors."""

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.outputs import load_matrix, read_names
from data import ImageLoadError, is_image_file
from predictor import ArtistModel, list_images
from retrieval.index import l2_normalize
from utils import UserError


def artist_of(name: str, where: str) -> str:
    """The artist of an image named ``artist/.../file.jpg`` (its top folder)."""
    parts = name.split("/")
    if len(parts) < 2:
        raise UserError(f"{name} (in {where}) is not inside an artist folder; put each artist's images in "
                        "<folder>/<artist>/")
    return parts[0]


def artist_images(root: str | os.PathLike) -> list[str]:
    """Image names (``artist/.../file``) under ``root``; every artist folder must hold at least one image."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} not found; pass a folder with one sub-folder per artist")
    names = list_images(root)
    for name in names:
        artist_of(name, str(root))
    with_images = {name.split("/")[0] for name in names}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in with_images:
            raise UserError(f"artist folder {folder} holds no images; add images (.jpg, .png, ...) or remove it")
    if not names:
        raise UserError(f"no image files in {root}; pass a folder with one sub-folder of images per artist")
    return names


def embed_images(artist_model: ArtistModel, root: str | os.PathLike, names: list[str], batch_size: int = 32,
                 num_workers: int = 0) -> tuple[list[str], np.ndarray]:
    """Unit style vectors of ``root/name`` for ``names``; unreadable images are warned about and left out."""
    if not names:
        return [], np.zeros((0, artist_model.feature_dim), np.float32)
    result = artist_model.run_paths([os.path.join(root, n) for n in names], "cluster", names=names,
                                    batch_size=batch_size, num_workers=num_workers, progress=len(names) > 100)
    if not result.names:
        raise UserError(f"none of the {len(names)} images in {root} could be read; check the files")
    return result.names, l2_normalize(result.features, "style vector")


def load_queries(query: str | os.PathLike, artist_model: ArtistModel | None, names_path: str | None = None,
                 **run_args: Any) -> tuple[list[str], np.ndarray]:
    """Query names and unit vectors from an image, a folder of images, or a ``.npy`` of style vectors."""
    path = Path(query)
    if path.suffix.lower() == ".npy":
        vectors = load_matrix(path)
        names = read_names(names_path) if names_path else [f"{path}[{i}]" for i in range(len(vectors))]
        if len(names) != len(vectors):
            raise UserError(f"{names_path} has {len(names)} names but {path} holds {len(vectors)} vectors")
        return names, l2_normalize(vectors, "query vector")
    if artist_model is None:
        raise UserError("image queries need the gallery's model: pass --checkpoint")
    if path.is_dir():
        names = list_images(path)
        if not names:
            raise UserError(f"no image files in {path}; image files end in .jpg, .png, .webp, ...")
        return embed_images(artist_model, path, names, **run_args)
    if not path.is_file():
        raise UserError(f"query {path} not found; pass an image, a folder of images or a .npy of style vectors")
    if not is_image_file(path):
        print(f"warning: {path} does not have an image file extension; trying to decode it", file=sys.stderr)
    try:
        vector = artist_model.extract_features(path)
    except ImageLoadError as err:
        raise UserError(f"cannot decode query {path} ({err.reason}); pass an image file") from None
    return [str(path)], l2_normalize(vector[None], "query vector")
