"""Artist galleries: reference style vectors of enrolled artists, saved as a self-describing folder.

A gallery folder holds::

    gallery.json      format, model identity (architecture, checkpoint SHA-256, feature size, preprocessing),
                      artists, unknown threshold and its calibration, index parameters
    vectors.npy       every reference vector, float32 N x D, L2-normalised
    prototypes.npy    one vector per artist (mean of its normalised vectors, re-normalised), rows in artist order
    references.json   {"artist": [...], "path": [...]}: artist and image of every row of vectors.npy
    index.faiss       only for galleries above the exact-search limit: the approximate Faiss index

Scores are cosine similarities (inner products of unit vectors). The folder is written to a temporary folder next
to the target and swapped in with ``os.replace``, so a failed run never leaves a half-written gallery.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.index import EXACT_LIMIT, build_index, l2_normalize, search
from utils import UserError

FORMAT = "artist-style-gallery"
VERSION = 1
GALLERY_FILE = "gallery.json"
VECTORS_FILE = "vectors.npy"
PROTOTYPES_FILE = "prototypes.npy"
REFERENCES_FILE = "references.json"
INDEX_FILE = "index.faiss"
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


@dataclass
class Gallery:
    """Reference vectors (unit rows) with their artists and image paths, and the model identity they came from."""

    vectors: np.ndarray
    artists: list[str]
    paths: list[str]
    model: dict[str, Any]
    unknown_threshold: float | None = None
    calibration: dict[str, Any] | None = None
    exact_limit: int = EXACT_LIMIT
    artist_thresholds: dict[str, float] | None = None  # per calibrated artist; unknown_threshold for the others
    _index: tuple[faiss.Index, dict] | None = field(default=None, repr=False)

    @cached_property
    def artist_names(self) -> list[str]:
        """Enrolled artists, sorted; row ``i`` of :attr:`prototypes` belongs to ``artist_names[i]``."""
        return sorted(set(self.artists))

    @cached_property
    def prototypes(self) -> np.ndarray:
        """Per-artist mean of the unit reference vectors, re-normalised (``len(artist_names) x D``)."""
        position = {name: i for i, name in enumerate(self.artist_names)}
        rows = np.array([position[a] for a in self.artists])
        sums = np.zeros((len(self.artist_names), self.vectors.shape[1]), np.float64)
        np.add.at(sums, rows, self.vectors)
        return l2_normalize(sums, "artist prototype")

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

    def index(self) -> tuple[faiss.Index, dict]:
        """The Faiss index over all reference vectors and its parameters (built on first use)."""
        if self._index is None:
            self._index = build_index(self.vectors, self.exact_limit)
        return self._index

    def identify(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, artist ids)`` of the ``top_k`` most similar artist prototypes per unit query, best first."""
        index = faiss.IndexFlatIP(self.prototypes.shape[1])
        index.add(self.prototypes)
        return search(index, queries, top_k)

    def unknown(self, scores: np.ndarray, ids: np.ndarray, threshold: float | None = None) -> np.ndarray | None:
        """Whether each query of :meth:`identify`'s ``(scores, ids)`` is an unknown artist: its best score is below
        ``threshold`` when given, else below its nearest artist's calibrated threshold. None: no threshold at all."""
        if threshold is None and self.unknown_threshold is None:
            return None
        if threshold is None:
            own = self.artist_thresholds or {}
            limits = np.array([own.get(name, self.unknown_threshold) for name in self.artist_names])
            return scores[:, 0] < limits[ids[:, 0]]
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

    def removed(self, artist: str) -> "Gallery":
        """A copy without ``artist``'s references; its threshold is kept but marked as calibrated before."""
        if artist not in self.artist_names:
            raise UserError(f"artist {artist!r} is not in the gallery; enrolled: {', '.join(self.artist_names)}")
        keep = [i for i, a in enumerate(self.artists) if a != artist]
        if not keep:
            raise UserError(f"{artist!r} is the only artist in the gallery; delete the gallery folder instead")
        thresholds = {a: t for a, t in (self.artist_thresholds or {}).items() if a != artist} or None
        return Gallery(self.vectors[keep], [self.artists[i] for i in keep], [self.paths[i] for i in keep],
                       self.model, self.unknown_threshold, self.calibration, self.exact_limit, thresholds)

    def extended(self, vectors: np.ndarray, artists: list[str], paths: list[str]) -> "Gallery":
        """A copy with more references appended (vectors are normalised here)."""
        return Gallery(np.concatenate([self.vectors, l2_normalize(vectors, "reference vector")]),
                       self.artists + artists, self.paths + paths, self.model, self.unknown_threshold,
                       self.calibration, self.exact_limit, self.artist_thresholds)

    def calibrate(self, vectors: np.ndarray, truth: list[str], target_false_unknown: float) -> float:
        """Set the unknown thresholds from unit vectors of held-out images of enrolled artists (``truth``: their
        artists); returns the share of them marked unknown.

        Artists differ in how alike their works are, so each gets its own threshold: the mean score of its held-out
        images against its prototype, plus one shared offset, the largest that marks at most
        ``target_false_unknown`` of the images unknown (each judged by the threshold of its nearest artist). Artists
        without held-out images get the mean of those means plus the offset (:attr:`unknown_threshold`).
        """
        if not truth:
            raise UserError("no calibration images of enrolled artists; pass a --calibrate folder with one "
                            "sub-folder per enrolled artist")
        position = {name: i for i, name in enumerate(self.artist_names)}
        own = np.array([position[a] for a in truth])
        similarity = vectors @ self.prototypes.T
        genuine = similarity[np.arange(len(own)), own]
        typical = {name: float(genuine[own == i].mean()) for name, i in position.items() if (own == i).any()}
        overall = float(np.mean(list(typical.values())))
        best, nearest = similarity.max(1, keepdims=True), similarity.argmax(1)[:, None]
        offsets = best[:, 0] - np.array([typical.get(self.artist_names[i], overall) for i in nearest[:, 0]])
        offset = calibrate_threshold(offsets, target_false_unknown)
        self.artist_thresholds = {name: mean + offset for name, mean in typical.items()}
        self.unknown_threshold = overall + offset
        return float(self.unknown(best, nearest).mean())

    def thresholds(self, threshold: float | None = None) -> dict[str, Any]:
        """The thresholds :meth:`unknown` applies, for reports: ``threshold`` for every artist when given, else the
        calibrated ones (``artist_thresholds``, and ``unknown_threshold`` for artists without their own)."""
        if threshold is not None:
            return {"unknown_threshold": threshold, "artist_thresholds": None}
        return {"unknown_threshold": self.unknown_threshold, "artist_thresholds": self.artist_thresholds}


def calibrate_threshold(best_scores: np.ndarray, target_false_unknown: float) -> float:
    """The largest threshold that marks at most ``target_false_unknown`` of ``best_scores`` (enrolled artists'
    held-out images) unknown: a score below the threshold is unknown."""
    if not 0.0 <= target_false_unknown < 1.0:
        raise UserError(f"--target-false-unknown is a rate in [0, 1), got {target_false_unknown}")
    ordered = np.sort(np.asarray(best_scores, np.float64))
    return float(ordered[int(np.floor(target_false_unknown * len(ordered)))])


def _metadata(gallery: Gallery, index_params: dict) -> dict[str, Any]:
    counts = {name: 0 for name in gallery.artist_names}
    for artist in gallery.artists:
        counts[artist] += 1
    return {"format": FORMAT, "version": VERSION, "model": gallery.model, "normalized": True, "metric": "cosine",
            "feature_dim": int(gallery.vectors.shape[1]), "num_vectors": len(gallery.artists),
            "artists": gallery.artist_names, "images_per_artist": counts,
            "unknown_threshold": gallery.unknown_threshold, "artist_thresholds": gallery.artist_thresholds,
            "calibration": gallery.calibration,
            "index": index_params}


def save_gallery(gallery: Gallery, output_dir: str | os.PathLike) -> Path:
    """Write the gallery folder atomically: into a temporary sibling folder, then swapped in with ``os.replace``.

    An existing ``output_dir`` must be empty or a gallery; it is replaced only once the new folder is complete.
    """
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / GALLERY_FILE).is_file())):
        raise UserError(f"{out} exists and is not a gallery folder; pass a new or empty --output-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    index, params = gallery.index()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        np.save(tmp / VECTORS_FILE, gallery.vectors.astype(np.float32))
        np.save(tmp / PROTOTYPES_FILE, gallery.prototypes)
        (tmp / REFERENCES_FILE).write_text(json.dumps({"artist": gallery.artists, "path": gallery.paths},
                                                      ensure_ascii=False), encoding="utf-8")
        if params["type"] != "flat_ip":
            faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / GALLERY_FILE).write_text(json.dumps(_metadata(gallery, params), ensure_ascii=False, indent=2) + "\n",
                                        encoding="utf-8")
        old = out.parent / f"{tmp.name}.old"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"gallery {path} is damaged ({detail}); rebuild it with tools/build_gallery.py")


def _read_metadata(path: Path) -> dict[str, Any]:
    if not (path / GALLERY_FILE).is_file():
        raise UserError(f"{path} is not a gallery folder (no {GALLERY_FILE}); build one with tools/build_gallery.py")
    try:
        meta = json.loads((path / GALLERY_FILE).read_text(encoding="utf-8"))
        references = json.loads((path / REFERENCES_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, f"{GALLERY_FILE} does not describe a {FORMAT}")
    if meta.get("version") != VERSION:
        raise UserError(f"gallery {path} has format version {meta.get('version')}, this code reads {VERSION}; "
                        "rebuild it with tools/build_gallery.py")
    if not isinstance(references, dict) or not all(isinstance(references.get(k), list) for k in ("artist", "path")):
        raise _corrupt(path, f"{REFERENCES_FILE} lacks its artist and path lists")
    meta["references"] = references
    return meta


def _read_vectors(path: Path, name: str, rows: int, dim: int) -> np.ndarray:
    try:
        vectors = np.load(path / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _corrupt(path, f"{name}: {err}") from None
    if vectors.shape != (rows, dim) or vectors.dtype != np.float32 or not np.isfinite(vectors).all():
        raise _corrupt(path, f"{name} holds {vectors.dtype} {vectors.shape}, expected finite float32 {(rows, dim)}")
    if rows and not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
        raise _corrupt(path, f"{name} rows are not unit vectors")
    return vectors


def load_gallery(gallery_dir: str | os.PathLike) -> Gallery:
    """Read and check a gallery folder written by :func:`save_gallery`; damage is a one-line :class:`UserError`."""
    path = Path(gallery_dir)
    meta = _read_metadata(path)
    artists, paths = meta["references"]["artist"], meta["references"]["path"]
    try:
        dim, count, index_params = int(meta["feature_dim"]), int(meta["num_vectors"]), dict(meta["index"])
        threshold = None if meta["unknown_threshold"] is None else float(meta["unknown_threshold"])
        own = meta.get("artist_thresholds")  # galleries calibrated before per-artist thresholds have none
        own = None if own is None else {str(a): float(t) for a, t in dict(own).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"{GALLERY_FILE} field {err}") from None
    if not (len(artists) == len(paths) == count) or not count:
        raise _corrupt(path, f"{count} vectors but {len(artists)} artists and {len(paths)} paths")
    vectors = _read_vectors(path, VECTORS_FILE, count, dim)
    gallery = Gallery(vectors, artists, paths, meta["model"], threshold, meta.get("calibration"),
                      int(index_params.get("exact_limit", EXACT_LIMIT)), own)
    prototypes = _read_vectors(path, PROTOTYPES_FILE, len(gallery.artist_names), dim)
    if not np.allclose(prototypes, gallery.prototypes, atol=1e-4):
        raise _corrupt(path, f"{PROTOTYPES_FILE} does not match {VECTORS_FILE}")
    if index_params.get("type") != "flat_ip":
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError as err:
            raise _corrupt(path, f"{INDEX_FILE}: {str(err).strip().splitlines()[-1]}") from None
        if index.ntotal != count or index.d != dim:
            raise _corrupt(path, f"{INDEX_FILE} holds {index.ntotal} x {index.d} vectors, expected {count} x {dim}")
        index.nprobe = int(index_params["nprobe"])
        gallery._index = (index, index_params)
    return gallery
