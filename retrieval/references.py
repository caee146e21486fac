"""Labelled image folders (one sub-folder per artist) and query inputs turned into unit style vectors."""

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.outputs import PART_FEATURES, PART_NAMES, PART_SKIPPED, load_matrix, part_data, read_names
from artifacts.work_folder import list_identity
from data import ImageLoadError, is_image_file
from data.scan import available_memory
from inference.results import JoinedPaths
from inference.sharding import Shards
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


NORMALIZE_BLOCK = 65536  # rows normalised at once


def _vector_buffer(count: int, dim: int, root: str | os.PathLike) -> np.ndarray:
    """An empty ``count x dim`` float32 array for the style vectors, after checking that the memory is there."""
    need, available = count * dim * 4, available_memory()
    if available is not None and need > available:
        raise UserError(f"the {dim}-value style vectors of {count} images in {root} need {need / 2**30:.1f} GiB of "
                        f"memory, {available / 2**30:.1f} GiB is available; embed fewer images at once (build the "
                        "gallery from part of them, then --add the rest)")
    return np.empty((count, dim), np.float32)


def embed_images(artist_model: ArtistModel, root: str | os.PathLike, names: list[str], batch_size: int = 32,
                 num_workers: int = 0, work: str | os.PathLike | None = None, resume: bool = False,
                 shards: Shards | None = None) -> tuple[list[str], np.ndarray] | None:
    """Unit style vectors of ``root/name`` for ``names``; unreadable images are warned about and left out.

    The vectors go batch by batch into one array. With ``work`` (a work folder, :mod:`artifacts.work_folder`) they
    are also kept on disk as they are computed, and ``resume`` continues an embedding interrupted there (its
    images, model and batch size must be the same; a run that never reached this work folder starts it). With
    ``shards`` of a ``torchrun`` run (and ``work``), each process embeds its shard and the main process returns all
    the vectors; the others return None.
    """
    if not names:
        return [], np.zeros((0, artist_model.feature_dim), np.float32)
    run_args = {"mode": "cluster", "batch_size": max(1, min(batch_size, len(names))), "num_workers": num_workers,
                "progress": len(names) > 100}
    if work is None:
        vectors = _vector_buffer(len(names), artist_model.feature_dim, root)
        kept: list[str] = []
        for batch in artist_model.stream_paths(JoinedPaths(root, names), names=names, **run_args):
            vectors[len(kept):len(kept) + len(batch.names)] = batch.features
            kept += batch.names
    else:
        embedded = _embed_to_work(artist_model, root, names, Path(work), resume, run_args, shards or Shards())
        if embedded is None:
            return None
        kept, vectors = embedded
    if not kept:
        raise UserError(f"none of the {len(names)} images in {root} could be read; check the files")
    vectors = vectors[:len(kept)]
    for start in range(0, len(vectors), NORMALIZE_BLOCK):  # in place, a block at a time: no second array
        vectors[start:start + NORMALIZE_BLOCK] = l2_normalize(vectors[start:start + NORMALIZE_BLOCK], "style vector")
    return kept, vectors


def _embed_to_work(artist_model: ArtistModel, root: str | os.PathLike, names: list[str], work: Path, resume: bool,
                   run_args: dict[str, Any], shards: Shards) -> tuple[list[str], np.ndarray] | None:
    """:func:`embed_images` through the work folder ``work``: the names and rows (not normalised) of the readable
    images, on the process that assembles them (None on the others)."""
    identity = {**artist_model.fingerprint(), "image folder": os.path.abspath(root), "image list": list_identity(names),
                "--batch-size": run_args["batch_size"]}
    # --resume of a command whose earlier run stopped before this stage starts the stage; without any work folder
    # (work.parent) it is refused.
    folder = shards.start(work, identity, len(names), run_args["batch_size"],
                          resume and (work.exists() or not work.parent.exists()))
    vectors = _vector_buffer(len(names), artist_model.feature_dim, root) if shards.is_main else None
    with shards.running(folder):
        for part in shards.mine(folder):
            todo = names[part.start + part.progress.done:part.stop]
            with part.writer((PART_FEATURES, PART_NAMES, PART_SKIPPED)) as writer:
                for batch in artist_model.stream_paths(JoinedPaths(root, todo), names=todo, **run_args):
                    data, _ = part_data(batch.names, batch.features, [asdict(s) for s in batch.skipped])
                    writer.append(len(batch.names) + len(batch.skipped), len(batch.names), data)
    if not shards.gather(folder) or vectors is None:
        return None
    kept = [name for part in folder.parts for name in part.lines(PART_NAMES)]
    flat = vectors.reshape(-1).view(np.uint8)
    offset = 0
    for chunk in (chunk for part in folder.parts for chunk in part.chunks(PART_FEATURES)):
        flat[offset:offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
        offset += len(chunk)
    return kept, vectors


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
