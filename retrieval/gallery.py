"""Artist galleries: reference style vectors of enrolled artists, saved as a self-describing folder.

A gallery folder (format version 2) holds::

    gallery.json        the manifest: format, model identity (architecture, checkpoint SHA-256, feature size,
                        preprocessing), artists, unknown thresholds and their calibration, index parameters, and
                        the names of the files below
    vectors*.npy        the reference vectors in shards of at most SHARD_ROWS rows, float32, L2-normalised
    references*.json    {"artist": [...], "path": [...]}: artist and image of every row of the shard beside it
    prototypes*.npy     one vector per artist (mean of its normalised vectors, re-normalised), in artist order
    index*.faiss        only for galleries above the exact-search limit: the approximate Faiss index

A new gallery's first files are ``vectors.npy``, ``references.json``, ``prototypes.npy`` and ``index.faiss`` (the
names of version 1, whose folders hold exactly these and load as one shard). ``--add`` writes only new shards, the
prototypes and the index under new names; a removal rewrites only the shards that held the artist. The manifest is
replaced last with ``os.replace``, so a failed write leaves the previous gallery valid; files no manifest names are
deleted after it. Vectors are memory-mapped on load, not read. Scores are cosine similarities (inner products of
unit vectors).
"""

import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from artifacts.model_source import file_sha256
from retrieval.index import (
    EXACT_LIMIT,
    INDEX_MEMORY_GIB,
    best_of,
    build_index,
    check_queries,
    gather_rows,
    l2_normalize,
    read_block,
    remove_rows,
    row_blocks,
    search,
    wrap_index,
)
from utils import UserError

FORMAT = "artist-style-gallery"
VERSION = 2
GALLERY_FILE = "gallery.json"
VECTORS_FILE = "vectors.npy"
PROTOTYPES_FILE = "prototypes.npy"
REFERENCES_FILE = "references.json"
INDEX_FILE = "index.faiss"
OWN_FILES = re.compile(r"(vectors|references|prototypes|index)(-\d+)?\.(npy|json|faiss)")
SHARD_ROWS = 65_536  # reference vectors per shard file
SCORE_BLOCK_BYTES = 64 * 2**20  # query x artist scores computed at once
CHECK_ROWS = 256  # rows per shard checked for finite unit vectors on load
CHECK_ARTISTS = 8  # artists whose prototypes are recomputed on load
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def model_identity(artist_model: Any) -> dict[str, Any]:
    """What a gallery's vectors depend on: architecture, weights (checkpoint SHA-256), style vector (descriptor) and
    its size, preprocessing."""
    if artist_model.checkpoint is None:
        raise UserError("the model has no checkpoint file to identify it; load it with predictor.load_model_bundle")
    preprocessing = {key: artist_model.data_config.get(key) for key in PREPROCESSING_KEYS}
    return json.loads(json.dumps({
        "architecture": artist_model.model_name,
        "checkpoint_sha256": file_sha256(artist_model.checkpoint),
        "descriptor": artist_model.descriptor,
        "feature_dim": artist_model.feature_dim,
        "preprocessing": preprocessing,
    }))


def close_names(name: str, names: list[str]) -> str:
    """A hint naming up to three of ``names`` close to ``name``, for an error message."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"none of the {len(names)} enrolled artists is close (names are case-sensitive)"


def artist_sums(blocks: Iterable[tuple[np.ndarray, np.ndarray]], artists: int, dim: int) -> np.ndarray:
    """Per-artist sums (float64, ``artists x dim``) of ``(vectors, artist ids)`` blocks."""
    sums = np.zeros((artists, dim), np.float64)
    for vectors, ids in blocks:
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        sums[ids[starts]] += np.add.reduceat(vectors[order], starts, axis=0, dtype=np.float64)
    return sums


class BaseGallery:
    """What every gallery store shares: the model identity check, identification by cosine to the artist
    prototypes, the unknown-artist thresholds and their calibration.

    A store (:class:`Gallery`: a folder; :class:`retrieval.milvus_gallery.MilvusGallery`: a Milvus collection)
    provides ``artist_names``, ``prototypes``, ``dim``, ``size``, :meth:`image_counts`, :meth:`nearest`,
    :meth:`work`, :meth:`known_paths`, :meth:`index_parameters`, :meth:`extended` and :meth:`removed`.
    """

    artist_names: list[str]  # enrolled artists, sorted; row i of ``prototypes`` belongs to artist_names[i]
    prototypes: np.ndarray  # per-artist mean of the unit reference vectors, re-normalised
    dim: int
    exact_limit: int  # search exactly up to this many references

    def __init__(self, model: dict[str, Any], unknown_threshold: float | None = None,
                 calibration: dict[str, Any] | None = None, artist_thresholds: dict[str, float] | None = None):
        self.model, self.calibration = model, calibration
        self._unknown_threshold, self._artist_thresholds = unknown_threshold, artist_thresholds
        self._limits: np.ndarray | None = None

    @property
    def unknown_threshold(self) -> float | None:
        return self._unknown_threshold

    @unknown_threshold.setter
    def unknown_threshold(self, value: float | None) -> None:
        self._unknown_threshold, self._limits = value, None

    @property
    def artist_thresholds(self) -> dict[str, float] | None:
        """Per calibrated artist; :attr:`unknown_threshold` for the others."""
        return self._artist_thresholds

    @artist_thresholds.setter
    def artist_thresholds(self, value: dict[str, float] | None) -> None:
        self._artist_thresholds, self._limits = value, None

    @property
    def descriptor(self) -> str:
        """The style vector the references are (galleries from before texture vectors hold pooled ones)."""
        return str(self.model.get("descriptor", "pooled"))

    def check_model(self, artist_model: Any, where: str) -> None:
        """Set ``artist_model`` to the gallery's style vector, and refuse a model other than the gallery's (its
        vectors would not be comparable)."""
        artist_model.use_descriptor(self.descriptor)
        self.check_identity(model_identity(artist_model), where)

    def check_identity(self, identity: dict[str, Any], where: str) -> None:
        """Refuse a :func:`model_identity` other than the gallery's."""
        for key, value in self.model.items():
            if identity.get(key) != value:
                raise UserError(f"gallery {where} was built with another model ({key}: {value} there, "
                                f"{identity.get(key)} here); use --checkpoint of that model or rebuild the gallery")

    def identify(self, queries: np.ndarray, top_k: int, block_rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, artist ids)`` of the ``top_k`` most similar artist prototypes per unit query, best first;
        exact, ``block_rows`` queries at a time (default: about ``SCORE_BLOCK_BYTES`` of scores)."""
        check_queries(queries, self.dim, top_k)
        prototypes = self.prototypes
        block = block_rows or max(1, SCORE_BLOCK_BYTES // (4 * len(prototypes)))
        k = min(top_k, len(prototypes))
        scores, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), block):
            stop = min(start + block, len(queries))
            scores[start:stop], ids[start:stop] = best_of(read_block(queries, start, stop) @ prototypes.T, k)
        return scores, ids

    def _threshold_limits(self) -> np.ndarray:
        """The threshold of every artist, in :attr:`artist_names` order (computed once per calibration)."""
        if self._limits is None:
            limits = np.full(len(self.artist_names), self.unknown_threshold, np.float64)
            position = {name: i for i, name in enumerate(self.artist_names)}
            for name, threshold in (self.artist_thresholds or {}).items():
                if name in position:
                    limits[position[name]] = threshold
            self._limits = limits
        return self._limits

    def unknown(self, scores: np.ndarray, ids: np.ndarray, threshold: float | None = None) -> np.ndarray | None:
        """Whether each query of :meth:`identify`'s ``(scores, ids)`` is an unknown artist: its best score is below
        ``threshold`` when given, else below its nearest artist's calibrated threshold. None: no threshold at all."""
        if threshold is None and self.unknown_threshold is None:
            return None
        if threshold is None:
            return scores[:, 0] < self._threshold_limits()[ids[:, 0]]
        return scores[:, 0] < threshold

    def match(self, features: np.ndarray, top_k: int, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per image: ``{"artists": [{"artist", "score"}, ...], "unknown": bool}``, cosine to the artist prototypes;
        ``unknown`` as :meth:`unknown` decides (``threshold`` overrides the calibrated thresholds)."""
        scores, ids = self.identify(l2_normalize(features, "style vector"), top_k)
        unknown = self.unknown(scores, ids, threshold)
        return [{"artists": [{"artist": self.artist_names[i], "score": float(s)}
                             for s, i in zip(row_scores, row_ids, strict=True)],
                 "unknown": bool(unknown is not None and unknown[row])}
                for row, (row_scores, row_ids) in enumerate(zip(scores, ids, strict=True))]

    def calibrate(self, vectors: np.ndarray, truth: list[str], target_false_unknown: float,
                  block_rows: int | None = None) -> float:
        """Set the unknown thresholds from unit vectors of held-out images of enrolled artists (``truth``: their
        artists); returns the share of them marked unknown.

        Artists differ in how alike their works are, so each gets its own threshold: the mean score of its held-out
        images against its prototype, plus one shared offset, the largest that marks at most
        ``target_false_unknown`` of the images unknown (each judged by the threshold of its nearest artist). Artists
        without held-out images get the mean of those means plus the offset (:attr:`unknown_threshold`). The scores
        are computed ``block_rows`` images at a time, so memory does not grow with images x artists.
        """
        if not truth:
            raise UserError("no calibration images of enrolled artists; pass a --calibrate folder with one "
                            "sub-folder per enrolled artist")
        position = {name: i for i, name in enumerate(self.artist_names)}
        own = np.fromiter((position[a] for a in truth), np.int64, len(truth))
        best, nearest = self.identify(vectors, 1, block_rows)
        step = block_rows or max(1, SCORE_BLOCK_BYTES // (4 * self.dim))
        genuine = np.concatenate([np.einsum("ij,ij->i", read_block(vectors, s, s + step),
                                            self.prototypes[own[s:s + step]]) for s in range(0, len(own), step)])
        counts = np.bincount(own, minlength=len(position))
        means = np.bincount(own, weights=genuine, minlength=len(position)) / np.maximum(counts, 1)
        present = counts > 0
        overall = float(means[present].mean())
        offsets = best[:, 0] - np.where(present, means, overall)[nearest[:, 0]]
        offset = calibrate_threshold(offsets, target_false_unknown)
        self.artist_thresholds = {self.artist_names[i]: float(means[i] + offset) for i in np.flatnonzero(present)}
        self.unknown_threshold = overall + offset
        return float(np.mean(offsets < offset))  # what unknown() decides, without rounding at the boundary

    def thresholds(self, threshold: float | None = None) -> dict[str, Any]:
        """The thresholds :meth:`unknown` applies, for reports: ``threshold`` for every artist when given, else the
        calibrated ones (``artist_thresholds``, and ``unknown_threshold`` for artists without their own)."""
        if threshold is not None:
            return {"unknown_threshold": threshold, "artist_thresholds": None}
        return {"unknown_threshold": self.unknown_threshold, "artist_thresholds": self.artist_thresholds}


class Gallery(BaseGallery):
    """Reference vectors (unit rows) with their artists and image paths, and the model identity they came from.

    ``vectors`` is one array or a list of parts (a loaded gallery's memory-mapped shards). The artist prototypes
    and their scores are computed once per object; :meth:`extended` and :meth:`removed` return new objects.
    """

    def __init__(self, vectors: np.ndarray | list[np.ndarray], artists: list[str], paths: list[str],
                 model: dict[str, Any], unknown_threshold: float | None = None,
                 calibration: dict[str, Any] | None = None, exact_limit: int = EXACT_LIMIT,
                 artist_thresholds: dict[str, float] | None = None, index_memory_gib: float = INDEX_MEMORY_GIB):
        self.parts = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
        super().__init__(model, unknown_threshold, calibration, artist_thresholds)
        self.artists, self.paths = list(artists), list(paths)
        self.exact_limit, self.index_memory_gib = exact_limit, index_memory_gib
        self._prototypes: np.ndarray | None = None
        self._index: tuple[Any, dict] | None = None
        self.folder: Path | None = None  # the folder whose files ``_stored`` names
        self._stored: list[dict | None] = [None] * len(self.parts)  # shard entry of each part on disk, if any
        self._files: dict[str, str | None] = {"prototypes": None, "index": None}
        self._next_file = 1  # the first unused file number of ``folder``

    @property
    def dim(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def vectors(self) -> np.ndarray:
        """All reference vectors as one array (a copy when the gallery has several parts)."""
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)

    @cached_property
    def artist_names(self) -> list[str]:
        """Enrolled artists, sorted; row ``i`` of :attr:`prototypes` belongs to ``artist_names[i]``."""
        return sorted(set(self.artists))

    @cached_property
    def artist_ids(self) -> np.ndarray:
        """Row ``i``'s artist as a position in :attr:`artist_names`."""
        position = {name: i for i, name in enumerate(self.artist_names)}
        return np.fromiter((position[a] for a in self.artists), np.int64, len(self.artists))

    @property
    def prototypes(self) -> np.ndarray:
        """Per-artist mean of the unit reference vectors, re-normalised (``len(artist_names) x D``)."""
        if self._prototypes is None:
            blocks = self._blocks_with_ids()
            sums = artist_sums(blocks, len(self.artist_names), self.dim)
            self._prototypes = l2_normalize(sums, "artist prototype")
        return self._prototypes

    def _blocks_with_ids(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        for block in row_blocks(self.parts):
            yield block, self.artist_ids[start:start + len(block)]
            start += len(block)

    def _prototypes_of(self, which: np.ndarray) -> np.ndarray:
        """Prototypes of the artists at the sorted positions ``which``, from their reference vectors."""
        rows = np.flatnonzero(np.isin(self.artist_ids, which))
        local = np.searchsorted(which, self.artist_ids[rows])
        return l2_normalize(artist_sums([(gather_rows(self.parts, rows), local)], len(which), self.dim),
                            "artist prototype")

    def _carried_prototypes(self, old: "Gallery", changed: set[str]) -> np.ndarray:
        """This gallery's prototypes: ``old``'s rows for its artists outside ``changed``, the others recomputed."""
        old_position = {name: i for i, name in enumerate(old.artist_names)}
        source = np.array([-1 if name in changed else old_position.get(name, -1) for name in self.artist_names])
        out = np.empty((len(source), self.dim), np.float32)
        kept = source >= 0
        out[kept] = old.prototypes[source[kept]]
        fresh = np.flatnonzero(~kept)
        if len(fresh):
            out[fresh] = self._prototypes_of(fresh)
        return out

    def index(self) -> tuple[Any, dict]:
        """The index over all reference vectors and its parameters (built on first use, then kept)."""
        if self._index is None:
            self._index = build_index(self.parts, self.exact_limit, memory_gib=self.index_memory_gib)
        return self._index

    def index_parameters(self) -> dict[str, Any]:
        """The search index's parameters, as reports record them."""
        return self.index()[1]

    @property
    def size(self) -> int:
        """The number of reference vectors."""
        return len(self.artists)

    def image_counts(self) -> dict[str, int]:
        """References per artist, in :attr:`artist_names` order."""
        counts = np.bincount(self.artist_ids, minlength=len(self.artist_names))
        return dict(zip(self.artist_names, counts.tolist(), strict=True))

    def nearest(self, queries: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        """Per unit query, the ``top_k`` most similar works ``{"id", "score", "artist", "path"}``, best first (``id``:
        the row, what :meth:`work` takes)."""
        scores, ids = search(self.index()[0], queries, top_k)
        return [[{"id": int(i), "score": float(s), "artist": self.artists[i], "path": self.paths[i]}
                 for s, i in zip(row_scores, row_ids, strict=True) if i >= 0]
                for row_scores, row_ids in zip(scores, ids, strict=True)]

    def work(self, image_id: int) -> tuple[str, str] | None:
        """``(artist, path)`` of work ``image_id`` (a :meth:`nearest` id), None when there is none."""
        return (self.artists[image_id], self.paths[image_id]) if 0 <= image_id < len(self.paths) else None

    def known_paths(self, paths: Iterable[str]) -> set[str]:
        """Those of ``paths`` that are references already."""
        return set(paths) & set(self.paths)

    def blocks(self) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
        """``(unit vectors, artists, paths)`` of consecutive rows, block by block (what a copy reads)."""
        start = 0
        for block in row_blocks(self.parts):
            yield block, self.artists[start:start + len(block)], self.paths[start:start + len(block)]
            start += len(block)

    def _derived(self, parts: list[np.ndarray], stored: list[dict | None], artists: list[str], paths: list[str],
                 thresholds: dict[str, float] | None) -> "Gallery":
        """A gallery over other references that keeps this one's model, settings and folder."""
        out = Gallery(parts, artists, paths, self.model, self.unknown_threshold, self.calibration,
                      self.exact_limit, thresholds, self.index_memory_gib)
        out.folder, out._stored, out._next_file = self.folder, stored, self._next_file
        return out

    def removed(self, artist: str) -> "Gallery":
        """A copy without ``artist``'s references; its threshold is kept but marked as calibrated before. Only the
        parts that held the artist are copied; an approximate index moves to the copy, without the artist."""
        position = {name: i for i, name in enumerate(self.artist_names)}
        if artist not in position:
            raise UserError(f"artist {artist!r} is not in the gallery; {close_names(artist, self.artist_names)}")
        rows = np.flatnonzero(self.artist_ids == position[artist])
        if len(rows) == len(self.artists):
            raise UserError(f"{artist!r} is the only artist in the gallery; delete the gallery folder instead")
        parts, stored, start = [], [], 0
        for part, entry in zip(self.parts, self._stored, strict=True):
            local = rows[(rows >= start) & (rows < start + len(part))] - start
            start += len(part)
            if len(local) < len(part):
                parts.append(np.delete(part, local, axis=0) if len(local) else part)
                stored.append(None if len(local) else entry)
        keep = np.ones(len(self.artists), bool)
        keep[rows] = False
        thresholds = {a: t for a, t in (self.artist_thresholds or {}).items() if a != artist} or None
        out = self._derived(parts, stored, [a for a, k in zip(self.artists, keep, strict=True) if k],
                            [p for p, k in zip(self.paths, keep, strict=True) if k], thresholds)
        out._prototypes = np.delete(self.prototypes, position[artist], axis=0)
        if self._index is not None and self._index[1]["type"] != "flat_ip":
            index, params = self._index
            remove_rows(getattr(index, "index", index), rows)
            out._index, self._index = (wrap_index(getattr(index, "index", index), out.parts, params), params), None
        return out

    def extended(self, vectors: np.ndarray, artists: list[str], paths: list[str]) -> "Gallery":
        """A copy with more references appended (vectors are normalised here); the stored parts are shared, and an
        approximate index moves to the copy with the new vectors added."""
        vectors = l2_normalize(vectors, "reference vector")
        if vectors.shape[1] != self.dim:
            raise UserError(f"new reference vectors have {vectors.shape[1]} values but the gallery holds "
                            f"{self.dim}; use the gallery's model and style vector")
        out = self._derived(self.parts + [vectors], self._stored + [None], self.artists + list(artists),
                            self.paths + list(paths), self.artist_thresholds)
        out._prototypes = out._carried_prototypes(self, set(artists))
        if self._index is not None and self._index[1]["type"] != "flat_ip":
            index, params = self._index
            base = getattr(index, "index", index)
            base.add(vectors)
            out._index, self._index = (wrap_index(base, out.parts, params), params), None
        return out



def calibrate_threshold(best_scores: np.ndarray, target_false_unknown: float) -> float:
    """The largest threshold that marks at most ``target_false_unknown`` of ``best_scores`` (enrolled artists'
    held-out images) unknown: a score below the threshold is unknown."""
    if not 0.0 <= target_false_unknown < 1.0:
        raise UserError(f"--target-false-unknown is a rate in [0, 1), got {target_false_unknown}")
    ordered = np.sort(np.asarray(best_scores, np.float64))
    return float(ordered[int(np.floor(target_false_unknown * len(ordered)))])


def _file_name(base: str, number: int) -> str:
    """``base`` for a new folder's first file, ``stem-<number>.suffix`` after it."""
    stem, suffix = base.rsplit(".", 1)
    return base if number == 0 else f"{stem}-{number}.{suffix}"


def save_rows(path: Path, blocks: Iterable[np.ndarray], rows: int, dim: int) -> None:
    """Write ``blocks`` (float32, ``rows x dim`` in all) as one ``.npy`` file without gathering them."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        for block in blocks:
            np.ascontiguousarray(block, np.float32).tofile(f)


def _write_json(path: Path, data: Any, by_key: bool = False) -> None:
    """``data`` as JSON; ``by_key``: one line per top-level key (readable, and fast for long lists)."""
    if by_key:
        text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in data.items())
        text += "\n}\n"
    else:
        text = json.dumps(data, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")


class _Writer:
    """Writes a gallery's new files into ``folder`` under unused names, remembering them to undo a failure."""

    def __init__(self, folder: Path, next_file: int):
        self.folder, self.next_file, self.written = folder, next_file, []

    def name(self, base: str, number: int) -> str:
        name = _file_name(base, number)
        self.written.append(self.folder / name)
        return name

    def shards(self, pieces: list[tuple[np.ndarray, int]], artists: list[str], paths: list[str],
               read: Callable[[np.ndarray, int, int], np.ndarray] = read_block) -> list[dict]:
        """Shards of at most ``SHARD_ROWS`` rows over ``pieces`` (``(part, its first row)``, consecutive); rows
        are read with ``read(part, start, stop)``."""
        groups, row = [[]], pieces[0][1]
        for part, _ in pieces:  # pack consecutive slices into shards of at most SHARD_ROWS rows
            for a in range(0, len(part), SHARD_ROWS):
                b = min(a + SHARD_ROWS, len(part))
                if sum(stop - start for _, start, stop in groups[-1]) + b - a > SHARD_ROWS:
                    groups.append([])
                groups[-1].append((part, a, b))
        entries = []
        for group in groups:
            number, self.next_file = self.next_file, self.next_file + 1
            rows = sum(b - a for _, a, b in group)
            entry = {"vectors": self.name(VECTORS_FILE, number), "references": self.name(REFERENCES_FILE, number),
                     "rows": rows}
            save_rows(self.folder / entry["vectors"], (read(p, a, b) for p, a, b in group), rows, group[0][0].shape[1])
            _write_json(self.folder / entry["references"], {"artist": artists[row:row + rows],
                                                            "path": paths[row:row + rows]})
            entries.append(entry)
            row += rows
        return entries

    def all_shards(self, gallery: Gallery, stored: list[dict | None]) -> list[dict]:
        """The gallery's shard entries: stored parts as they are, runs of new parts written as new shards."""
        tail = len(stored)
        while tail and stored[tail - 1] is None:
            tail -= 1
        if 1 < tail < len(stored) and stored[tail - 1]["rows"] < SHARD_ROWS // 2:
            # a small appended shard is rewritten with the new rows (the first shard keeps its name)
            stored = stored[:tail - 1] + [None] * (len(stored) - tail + 1)
        entries, run, row = [], [], 0
        for part, entry in zip(gallery.parts, stored, strict=True):
            if entry is None:
                run.append((part, row))
            else:
                if run:
                    entries += self.shards(run, gallery.artists, gallery.paths)
                    run = []
                entries.append(entry)
            row += len(part)
        return entries + (self.shards(run, gallery.artists, gallery.paths) if run else [])

    def manifest(self, gallery: Gallery, fresh: bool) -> dict[str, Any]:
        """Write what is not on disk yet and return the manifest naming every file."""
        stored = [None] * len(gallery.parts) if fresh else gallery._stored
        files = {"prototypes": None, "index": None} if fresh else dict(gallery._files)
        shards = self.all_shards(gallery, stored)
        index, params = gallery.index()
        number = 0 if fresh else self.next_file
        if files["prototypes"] is None:
            files["prototypes"] = self.name(PROTOTYPES_FILE, number)
            np.save(self.folder / files["prototypes"], gallery.prototypes)
        if params["type"] != "flat_ip" and files["index"] is None:
            files["index"] = self.name(INDEX_FILE, number)
            faiss.write_index(getattr(index, "index", index), str(self.folder / files["index"]))
        self.next_file += 1
        return {**_metadata(gallery, params), "shards": shards, "prototypes_file": files["prototypes"],
                "index_file": files["index"] if params["type"] != "flat_ip" else None, "next_file": self.next_file}


def _metadata(gallery: Gallery, index_params: dict) -> dict[str, Any]:
    counts = np.bincount(gallery.artist_ids, minlength=len(gallery.artist_names))
    return {"format": FORMAT, "version": VERSION, "model": gallery.model, "normalized": True, "metric": "cosine",
            "feature_dim": gallery.dim, "num_vectors": len(gallery.artists),
            "artists": gallery.artist_names,
            "images_per_artist": dict(zip(gallery.artist_names, counts.tolist(), strict=True)),
            "unknown_threshold": gallery.unknown_threshold, "artist_thresholds": gallery.artist_thresholds,
            "calibration": gallery.calibration, "index": index_params}


def _attach(gallery: Gallery, folder: Path, manifest: dict[str, Any], parts: list[np.ndarray] | None = None) -> None:
    """Point ``gallery`` at the files of ``manifest`` in ``folder``: its parts become the memory-mapped shards."""
    gallery.parts = parts or [np.load(folder / shard["vectors"], mmap_mode="r") for shard in manifest["shards"]]
    gallery.folder, gallery._stored = folder, list(manifest["shards"])
    gallery._files = {"prototypes": manifest["prototypes_file"], "index": manifest["index_file"]}
    gallery._next_file = manifest["next_file"]
    if gallery._index is not None and hasattr(gallery._index[0], "vectors"):
        gallery._index[0].vectors = gallery.parts


def _remove_unreferenced(folder: Path, manifest: dict[str, Any]) -> None:
    keep = {manifest["prototypes_file"], manifest["index_file"]}
    keep.update(name for shard in manifest["shards"] for name in (shard["vectors"], shard["references"]))
    for path in folder.iterdir():
        if OWN_FILES.fullmatch(path.name) and path.name not in keep:
            try:
                path.unlink()
            except OSError:  # still mapped elsewhere (Windows): a later write removes it
                pass


def _update_in_place(gallery: Gallery, folder: Path) -> None:
    """Write only what changed into the gallery's own folder; the manifest is replaced last."""
    on_disk = json.loads((folder / GALLERY_FILE).read_text(encoding="utf-8")).get("next_file", 1)
    writer = _Writer(folder, max(int(on_disk), gallery._next_file))
    temporary = folder / f".{GALLERY_FILE}.{os.getpid()}.tmp"
    try:
        manifest = writer.manifest(gallery, fresh=False)
        _write_json(temporary, manifest, by_key=True)
        os.replace(temporary, folder / GALLERY_FILE)
    except BaseException:
        for path in [*writer.written, temporary]:
            path.unlink(missing_ok=True)
        raise
    _attach(gallery, folder, manifest)
    _remove_unreferenced(folder, manifest)


def save_gallery(gallery: Gallery, output_dir: str | os.PathLike) -> Path:
    """Write the gallery folder atomically.

    A gallery loaded from ``output_dir`` writes only its new files there and then replaces the manifest. Otherwise
    the folder is written into a temporary sibling folder and swapped in with ``os.replace``; an existing
    ``output_dir`` must be empty or a gallery, and is replaced only once the new folder is complete.
    """
    out = Path(output_dir)
    if gallery.folder is not None and (out / GALLERY_FILE).is_file() and out.resolve() == gallery.folder.resolve():
        _update_in_place(gallery, out)
        return out
    with _new_folder(out) as tmp:
        manifest = _Writer(tmp, 0).manifest(gallery, fresh=True)
        _write_json(tmp / GALLERY_FILE, manifest, by_key=True)
    _attach(gallery, out, manifest)
    return out


@contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write a gallery into; swapped in for ``out`` when the block succeeds. An
    existing ``out`` must be empty or a gallery."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / GALLERY_FILE).is_file())):
        raise UserError(f"{out} exists and is not a gallery folder; pass a new or empty --output-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        old = out.parent / f"{tmp.name}.old"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_features(path: str | os.PathLike, rows: int, model: dict[str, Any]) -> np.ndarray:
    """A features ``.npy`` (N x D real numbers, N = ``rows``) memory-mapped, not read; ``model`` without
    ``feature_dim`` gets the file's, one with another is refused."""
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"cannot read {path} as a .npy array ({err}); pass the features.npy of inference") from None
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating) or not features.flags.c_contiguous:
        raise UserError(f"{path} holds {features.dtype} {features.shape}; expected an N x D float matrix in C order")
    if len(features) != rows:
        raise UserError(f"{path} holds {len(features)} vectors but {rows} names were given; pass the names file "
                        "written with it")
    if model.setdefault("feature_dim", features.shape[1]) != features.shape[1]:
        raise UserError(f"{path} holds {features.shape[1]}-value vectors but the model's {model.get('descriptor')} "
                        f"style vector has {model['feature_dim']}; pass the features of that style vector")
    return features


def build_from_features(features: str | os.PathLike, artists: list[str], paths: list[str], model: dict[str, Any],
                        output_dir: str | os.PathLike, exact_limit: int = EXACT_LIMIT,
                        index_memory_gib: float = INDEX_MEMORY_GIB) -> Gallery:
    """A new gallery folder from a features ``.npy`` read block by block: each row L2-normalised into the shard
    files, then the prototypes and the index computed from those (memory-mapped) shards. Memory grows with the
    artists and the index, not with the vectors."""
    source = open_features(features, len(artists), model)
    out = Path(output_dir)
    with _new_folder(out) as tmp:
        writer = _Writer(tmp, 0)
        shards = writer.shards([(source, 0)], artists, paths,
                               lambda part, a, b: l2_normalize(read_block(part, a, b), "feature row", a))
        gallery = Gallery([np.load(tmp / s["vectors"], mmap_mode="r") for s in shards], artists, paths, model,
                          exact_limit=exact_limit, index_memory_gib=index_memory_gib)
        gallery._stored = shards
        manifest = writer.manifest(gallery, fresh=False)
        _write_json(tmp / GALLERY_FILE, manifest, by_key=True)
    _attach(gallery, out, manifest)
    return gallery


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"gallery {path} is damaged ({detail}); rebuild it with tools/build_gallery.py")


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"{name}: {type(err).__name__}: {err}") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    """``gallery.json`` checked; a version-1 manifest gets the file names of that version (one shard)."""
    if not (path / GALLERY_FILE).is_file():
        raise UserError(f"{path} is not a gallery folder (no {GALLERY_FILE}); build one with tools/build_gallery.py")
    meta = _read_json(path, GALLERY_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, f"{GALLERY_FILE} does not describe a {FORMAT}")
    if meta.get("version") not in (1, VERSION):
        raise UserError(f"gallery {path} has format version {meta.get('version')}, this code reads 1 and {VERSION}; "
                        "rebuild it with tools/build_gallery.py")
    if meta["version"] == 1:
        meta.update(shards=[{"vectors": VECTORS_FILE, "references": REFERENCES_FILE, "rows": meta.get("num_vectors")}],
                    prototypes_file=PROTOTYPES_FILE, index_file=INDEX_FILE, next_file=1)
    return meta


def _read_references(path: Path, shard: dict[str, Any]) -> dict[str, list]:
    references = _read_json(path, shard["references"])
    if not isinstance(references, dict) or not all(isinstance(references.get(k), list) for k in ("artist", "path")):
        raise _corrupt(path, f"{shard['references']} lacks its artist and path lists")
    if not len(references["artist"]) == len(references["path"]) == shard["rows"]:
        raise _corrupt(path, f"{shard['references']} lists {len(references['artist'])} artists and "
                             f"{len(references['path'])} paths for {shard['rows']} vectors")
    return references


def _read_vectors(path: Path, name: str, rows: int, dim: int, mmap: bool) -> np.ndarray:
    """A ``rows x dim`` float32 file (memory-mapped when ``mmap``), checked on up to ``CHECK_ROWS`` rows."""
    try:
        vectors = np.load(path / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _corrupt(path, f"{name}: {err}") from None
    if vectors.shape != (rows, dim) or vectors.dtype != np.float32:
        raise _corrupt(path, f"{name} holds {vectors.dtype} {vectors.shape}, expected float32 {(rows, dim)}")
    sample = vectors[np.unique(np.linspace(0, rows - 1, min(rows, CHECK_ROWS)).astype(np.int64))] if rows else vectors
    norms = np.linalg.norm(sample, axis=1)
    if not (np.isfinite(norms).all() and np.allclose(norms, 1.0, atol=1e-3)):
        raise _corrupt(path, f"{name} rows are not finite unit vectors")
    return vectors


def _read_index(path: Path, meta: dict[str, Any], gallery: Gallery) -> None:
    """Load the approximate index the manifest names (exact ones are built on first use)."""
    params = dict(meta["index"])
    if params.get("type") == "flat_ip":
        return
    try:
        index = faiss.read_index(str(path / meta["index_file"]))
    except RuntimeError as err:
        raise _corrupt(path, f"{meta['index_file']}: {str(err).strip().splitlines()[-1]}") from None
    if index.ntotal != len(gallery.artists) or index.d != gallery.dim:
        raise _corrupt(path, f"{meta['index_file']} holds {index.ntotal} x {index.d} vectors, expected "
                             f"{len(gallery.artists)} x {gallery.dim}")
    index.nprobe = int(params["nprobe"])
    gallery._index = (wrap_index(index, gallery.parts, params), params)


def _check_prototypes(path: Path, gallery: Gallery, prototypes: np.ndarray) -> None:
    """Recompute up to ``CHECK_ARTISTS`` prototypes (spread over the artists) from their vectors."""
    which = np.unique(np.linspace(0, len(prototypes) - 1, min(len(prototypes), CHECK_ARTISTS)).astype(np.int64))
    if not np.allclose(prototypes[which], gallery._prototypes_of(which), atol=1e-4):
        raise _corrupt(path, "the prototypes do not match the vectors")


def load_gallery(gallery_dir: str | os.PathLike) -> Gallery:
    """Read and check a gallery folder written by :func:`save_gallery` (or a version-1 folder); the vectors are
    memory-mapped. Damage is a one-line :class:`UserError`."""
    path = Path(gallery_dir)
    meta = _read_manifest(path)
    try:
        dim, count, index_params = int(meta["feature_dim"]), int(meta["num_vectors"]), dict(meta["index"])
        threshold = None if meta["unknown_threshold"] is None else float(meta["unknown_threshold"])
        own = meta.get("artist_thresholds")  # galleries calibrated before per-artist thresholds have none
        own = None if own is None else {str(a): float(t) for a, t in dict(own).items()}
        shards = [dict(shard, rows=int(shard["rows"])) for shard in meta["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"{GALLERY_FILE} field {err}") from None
    if sum(shard["rows"] for shard in shards) != count or not count:
        raise _corrupt(path, f"{count} vectors but the shards hold {sum(shard['rows'] for shard in shards)}")
    artists, paths = [], []
    for shard in shards:
        references = _read_references(path, shard)
        artists += references["artist"]
        paths += references["path"]
    parts = [_read_vectors(path, shard["vectors"], shard["rows"], dim, mmap=True) for shard in shards]
    gallery = Gallery(parts, artists, paths, meta["model"], threshold, meta.get("calibration"),
                      int(index_params.get("exact_limit", EXACT_LIMIT)), own,
                      float(index_params.get("memory_gib", INDEX_MEMORY_GIB)))
    if meta.get("artists") != gallery.artist_names:
        raise _corrupt(path, f"the artists of {GALLERY_FILE} differ from those of the references")
    prototypes = _read_vectors(path, meta["prototypes_file"], len(gallery.artist_names), dim, mmap=False)
    _check_prototypes(path, gallery, prototypes)
    gallery._prototypes = prototypes
    _read_index(path, meta, gallery)
    _attach(gallery, path, {**meta, "shards": shards}, parts)
    return gallery
