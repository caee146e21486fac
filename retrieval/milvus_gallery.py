"""Galleries in Milvus (through ``pymilvus``): the gallery of a folder, kept in two collections of a Milvus Lite file
or a Milvus server, for galleries too large for one process's memory.

A location ``URI[#NAME]`` (:mod:`retrieval.store`) names two collections::

    NAME            one row per reference: id (INT64, primary; increasing in the order the references were added),
                    artist, path, vector (FLOAT_VECTOR, L2-normalised). Its property ``artist_style_gallery`` holds
                    the gallery's metadata as JSON: format, version, model identity (architecture, checkpoint
                    SHA-256, style vector, feature size, preprocessing), unknown threshold, calibration, index, the
                    next id and a revision counted up by every write
    NAME__artists   one row per artist: id (INT64, primary: the first 8 bytes of the name's SHA-256, as
                    pymilvus's iterators cannot page on names holding quotes), artist, prototype (FLOAT_VECTOR: the
                    mean of its unit vectors, re-normalised), images, threshold and calibrated (its own calibrated
                    threshold, if any)

Scores are inner products of unit vectors (metric IP = cosine). The reference index is FLAT (exact) up to the
gallery's exact limit (100 000 vectors, as for a folder) and IVF_FLAT above it, with a folder gallery's IVF
parameters (about sqrt(N) lists, one in ten visited, at least 16); a FLAT index is rebuilt as IVF_FLAT when a gallery
grows past the limit. Identification loads the prototypes (artists x D floats) into memory and scores them exactly,
as a folder gallery does; nearest works are searched by Milvus, so the references never enter this process.

:meth:`MilvusGallery.extended`, :meth:`~MilvusGallery.removed` and calibration change the object only;
:meth:`MilvusGallery.save` writes the changes (deletions, then insertions, then the artists' rows, then the metadata).
Milvus has no transactions: an interrupted save leaves the collections partly changed (copy the gallery from a folder
again). The metadata is written last when a gallery is created, so a half-created collection is refused on opening.
"""

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from retrieval.gallery import FORMAT, VERSION, BaseGallery, artist_sums, close_names
from retrieval.index import EXACT_LIMIT, check_queries, ivf_parameters, l2_normalize
from retrieval.store import Blocks, is_server, split_location
from utils import UserError

META_PROPERTY = "artist_style_gallery"
ARTISTS_SUFFIX = "__artists"
REFERENCE_FIELDS = ("id", "artist", "path", "vector")
ARTIST_FIELDS = ("id", "artist", "prototype", "images", "threshold", "calibrated")
CONNECT_TIMEOUT_S = 10.0
WRITE_ROWS = 4096  # references per insert call (about 7 MB of 448-value vectors)
READ_ROWS = 4096  # rows per query-iterator page
SEARCH_QUERIES = 256  # queries per search call
PATHS_PER_QUERY = 256  # paths per "path in [...]" query
MAX_TOP_K = 16_384  # Milvus returns at most this many hits per query
MAX_ARTIST_CHARS = 1024
MAX_PATH_CHARS = 4096

_clients: dict[str, MilvusClient] = {}
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors are raised as one-line UserErrors instead


@contextmanager
def milvus_errors(location: str) -> Iterator[None]:
    """A Milvus error as one line naming the location and what to do."""
    try:
        yield
    except MilvusException as err:
        message = str(getattr(err, "message", "") or err).strip().splitlines()[0]
        if "connect" in message.lower() or "unavailable" in message.lower():
            raise UserError(f"cannot reach Milvus at {location} ({message}); start the Milvus server or correct the "
                            "URI (a Milvus Lite gallery is a path ending in .db)") from None
        raise UserError(f"Milvus at {location} failed: {message}; check the server and the collection") from None


def connect(location: str) -> tuple[MilvusClient, str]:
    """A client of the location's Milvus (one per URI and process) and the collection name."""
    uri, name = split_location(location)
    if uri not in _clients:
        if not is_server(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with milvus_errors(location):
            _clients[uri] = MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S)
    return _clients[uri], name


def disconnect(location: str) -> None:
    """Close this process's client of the location's Milvus; for a Milvus Lite file also stop its embedded server,
    which writes what it still holds in memory into the file (else it does so when the process exits, recreating a
    file removed since)."""
    uri, _ = split_location(location)
    client = _clients.pop(uri, None)
    if client is None:
        return
    client.close()
    if not is_server(uri):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def artist_key(artist: str) -> int:
    """The primary key of an artist's row: the first 8 bytes of its name's SHA-256 as a signed integer."""
    return int.from_bytes(hashlib.sha256(artist.encode("utf-8")).digest()[:8], "big", signed=True)


def _literal(text: str) -> str:
    """``text`` as a string literal of a Milvus filter expression."""
    return json.dumps(text, ensure_ascii=False)


def index_for(count: int, exact_limit: int = EXACT_LIMIT) -> dict[str, Any]:
    """The reference index for ``count`` vectors: FLAT up to ``exact_limit``, IVF_FLAT with a folder gallery's IVF
    parameters above."""
    if count <= exact_limit:
        return {"type": "FLAT", "metric": "IP", "exact_limit": exact_limit}
    ivf = ivf_parameters(count)
    return {"type": "IVF_FLAT", "metric": "IP", "nlist": ivf["nlist"], "nprobe": ivf["nprobe"],
            "exact_limit": exact_limit}


def _index_params(client: MilvusClient, field: str, index: dict[str, Any]) -> Any:
    params = client.prepare_index_params()
    extra = {"nlist": index["nlist"]} if index["type"] == "IVF_FLAT" else {}
    params.add_index(field, index_type=index["type"], metric_type="IP", params=extra)
    return params


def _schemas(client: MilvusClient, dim: int) -> tuple[Any, Any]:
    references = client.create_schema(auto_id=False, enable_dynamic_field=False)
    references.add_field("id", DataType.INT64, is_primary=True)
    references.add_field("artist", DataType.VARCHAR, max_length=MAX_ARTIST_CHARS)
    references.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_CHARS)
    references.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    artists = client.create_schema(auto_id=False, enable_dynamic_field=False)
    artists.add_field("id", DataType.INT64, is_primary=True)
    artists.add_field("artist", DataType.VARCHAR, max_length=MAX_ARTIST_CHARS)
    artists.add_field("prototype", DataType.FLOAT_VECTOR, dim=dim)
    artists.add_field("images", DataType.INT64)
    artists.add_field("threshold", DataType.DOUBLE)
    artists.add_field("calibrated", DataType.BOOL)
    return references, artists


def _fields(description: dict[str, Any]) -> tuple[str, ...]:
    return tuple(field["name"] for field in description["fields"])


def _read_meta(client: MilvusClient, name: str, location: str) -> dict[str, Any]:
    """The metadata of the gallery collection ``name``, checked (missing, or another schema: one line)."""
    if not client.has_collection(name):
        raise UserError(f"Milvus at {location} holds no gallery {name!r}; build one with tools/build_gallery.py "
                        f"--output-dir {location}, or copy one with tools/gallery_copy.py")
    description = client.describe_collection(name)
    text = description.get("properties", {}).get(META_PROPERTY)
    if _fields(description) != REFERENCE_FIELDS or text is None or not client.has_collection(name + ARTISTS_SUFFIX):
        raise UserError(f"collection {name!r} at {location} is not an artist gallery (fields "
                        f"{', '.join(_fields(description))}; no complete {META_PROPERTY}); pass another collection "
                        "as URI#NAME")
    meta = json.loads(text)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"collection {name!r} at {location} holds {meta.get('format')} version "
                        f"{meta.get('version')}, this code reads {FORMAT} version {VERSION}; copy the gallery again")
    if _fields(client.describe_collection(name + ARTISTS_SUFFIX)) != ARTIST_FIELDS:
        raise UserError(f"collection {name + ARTISTS_SUFFIX!r} at {location} is not a gallery's artists; drop it and "
                        "copy the gallery again")
    return meta


def exists(location: str) -> bool:
    """Whether ``location`` holds a gallery collection (it may still be another schema: opening says)."""
    client, name = connect(location)
    with milvus_errors(location):
        return bool(client.has_collection(name))


def revision(location: str) -> int | None:
    """The revision of the gallery at ``location`` (counted up by every write), None when there is none."""
    client, name = connect(location)
    with milvus_errors(location):
        if not client.has_collection(name):
            return None
        text = client.describe_collection(name).get("properties", {}).get(META_PROPERTY)
    return None if text is None else int(json.loads(text).get("revision", 0))


def _iterate(client: MilvusClient, name: str, fields: list[str], where: str = "") -> Iterator[list[dict]]:
    """Pages of the rows of ``name`` matching ``where``, in primary-key order."""
    pages = client.query_iterator(name, batch_size=READ_ROWS, filter=where, output_fields=fields)
    try:
        while page := pages.next():
            yield page
    finally:
        pages.close()


def _vectors(rows: list[dict], field: str, dim: int) -> np.ndarray:
    return np.asarray([row[field] for row in rows], np.float32).reshape(len(rows), dim)


class MilvusGallery(BaseGallery):
    """A gallery in Milvus: prototypes, counts and thresholds in memory, references in the collection.

    :meth:`extended` and :meth:`removed` return new objects holding the pending changes; :meth:`save` writes them.
    """

    def __init__(self, location: str, meta: dict[str, Any], names: list[str], prototypes: np.ndarray,
                 counts: np.ndarray, artist_thresholds: dict[str, float] | None):
        super().__init__(meta["model"], meta.get("unknown_threshold"), meta.get("calibration"), artist_thresholds)
        self.location, self.meta = location, meta
        self.client, self.name = connect(location)
        self.artist_names, self.prototypes, self.counts = names, prototypes, counts
        self.dim = int(meta["feature_dim"])
        self._deleted: set[str] = set()
        self._inserted: list[tuple[np.ndarray, list[str], list[str]]] = []
        self._changed: set[str] = set()  # artists whose rows of NAME__artists are to be written
        self._saved_thresholds = (self.unknown_threshold, artist_thresholds)

    @property
    def size(self) -> int:
        return int(self.counts.sum())

    @property
    def exact_limit(self) -> int:
        return int(self.meta["index"]["exact_limit"])

    def index_parameters(self) -> dict[str, Any]:
        return dict(self.meta["index"])

    def image_counts(self) -> dict[str, int]:
        return dict(zip(self.artist_names, self.counts.tolist(), strict=True))

    def nearest(self, queries: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        """Per unit query, the ``top_k`` most similar stored works ``{"id", "score", "artist", "path"}``, best first
        (``id``: the primary key)."""
        check_queries(queries, self.dim, top_k)
        if top_k > MAX_TOP_K:
            raise UserError(f"a Milvus gallery returns at most {MAX_TOP_K} works per query; lower --top-k")
        index = self.meta["index"]
        search_params = {"metric_type": "IP", "params": {"nprobe": index["nprobe"]} if "nprobe" in index else {}}
        out = []
        with milvus_errors(self.location):
            for start in range(0, len(queries), SEARCH_QUERIES):
                block = np.ascontiguousarray(queries[start:start + SEARCH_QUERIES], np.float32)
                hits = self.client.search(self.name, data=list(block), limit=min(top_k, self.size),
                                          output_fields=["artist", "path"], search_params=search_params,
                                          anns_field="vector")
                out += [[{"id": int(hit["id"]), "score": float(hit["distance"]), "artist": hit["entity"]["artist"],
                          "path": hit["entity"]["path"]} for hit in row] for row in hits]
        return out

    def work(self, image_id: int) -> tuple[str, str] | None:
        with milvus_errors(self.location):
            rows = self.client.get(self.name, ids=[int(image_id)], output_fields=["artist", "path"])
        return (rows[0]["artist"], rows[0]["path"]) if rows else None

    def known_paths(self, paths: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(paths))
        known = {p for _, _, pending in self._inserted for p in pending}
        with milvus_errors(self.location):
            for start in range(0, len(wanted), PATHS_PER_QUERY):
                batch = wanted[start:start + PATHS_PER_QUERY]
                where = f"path in [{', '.join(_literal(p) for p in batch)}]"
                known.update(row["path"] for row in self.client.query(self.name, filter=where,
                                                                      output_fields=["path"], limit=MAX_TOP_K))
        return known & set(wanted)

    def blocks(self) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
        """``(unit vectors, artists, paths)`` of the stored references in id order, page by page."""
        with milvus_errors(self.location):
            for page in _iterate(self.client, self.name, ["artist", "path", "vector"]):
                page.sort(key=lambda row: row["id"])
                yield (_vectors(page, "vector", self.dim), [row["artist"] for row in page],
                       [row["path"] for row in page])

    def _copy(self) -> "MilvusGallery":
        out = object.__new__(MilvusGallery)
        out.__dict__.update(self.__dict__)
        out._limits = None
        return out

    def _artist_sum(self, artist: str) -> np.ndarray:
        """Sum (float64) of ``artist``'s unit vectors: stored (unless removed since loading) and pending."""
        total = np.zeros(self.dim, np.float64)
        if artist in self.artist_names and artist not in self._deleted:
            with milvus_errors(self.location):
                for page in _iterate(self.client, self.name, ["vector"], f"artist == {_literal(artist)}"):
                    total += _vectors(page, "vector", self.dim).sum(0, dtype=np.float64)
        for vectors, artists, _ in self._inserted:
            total += artist_sums([(vectors, (np.asarray(artists) == artist).astype(np.int64))], 2, self.dim)[1]
        return total

    def extended(self, vectors: np.ndarray, artists: list[str], paths: list[str]) -> "MilvusGallery":
        """A copy with more references pending (normalised here); the changed artists' prototypes recomputed."""
        vectors = l2_normalize(vectors, "reference vector")
        if vectors.shape[1] != self.dim:
            raise UserError(f"new reference vectors have {vectors.shape[1]} values but the gallery holds "
                            f"{self.dim}; use the gallery's model and style vector")
        changed = sorted(set(artists))
        sums = {a: self._artist_sum(a) for a in changed}  # before the new rows are pending
        out = self._copy()
        out._inserted = self._inserted + [(vectors, list(artists), list(paths))]
        new = np.asarray(artists)
        for artist in changed:
            sums[artist] += vectors[new == artist].sum(0, dtype=np.float64)
        old = dict(zip(self.artist_names, range(len(self.artist_names)), strict=True))
        out.artist_names = sorted(set(self.artist_names) | set(changed))
        out.prototypes = np.stack([self.prototypes[old[a]] if a not in sums else
                                   l2_normalize(sums[a][None], "artist prototype")[0] for a in out.artist_names])
        added = {a: int((new == a).sum()) for a in changed}
        out.counts = np.array([(self.counts[old[a]] if a in old else 0) + added.get(a, 0) for a in out.artist_names])
        out._changed = self._changed | set(changed)
        return out

    def removed(self, artist: str) -> "MilvusGallery":
        """A copy without ``artist`` (pending); its threshold is dropped with it."""
        if artist not in self.artist_names:
            raise UserError(f"artist {artist!r} is not in the gallery; {close_names(artist, self.artist_names)}")
        if len(self.artist_names) == 1:
            raise UserError(f"{artist!r} is the only artist in the gallery; drop its collections instead")
        out = self._copy()
        out._deleted = self._deleted | {artist}
        out._inserted = [(v[np.asarray(a) != artist], [x for x in a if x != artist],
                          [p for p, x in zip(ps, a, strict=True) if x != artist]) for v, a, ps in self._inserted]
        keep = np.asarray([a != artist for a in self.artist_names])
        out.artist_names = [a for a in self.artist_names if a != artist]
        out.prototypes, out.counts = self.prototypes[keep], self.counts[keep]
        out._artist_thresholds = {a: t for a, t in (self.artist_thresholds or {}).items() if a != artist} or None
        out._changed = self._changed - {artist}
        return out

    def save(self) -> None:
        """Write the pending changes and the thresholds into the collections; the revision counts up."""
        thresholds_changed = (self.unknown_threshold, self.artist_thresholds) != self._saved_thresholds
        artists = set(self.artist_names) if thresholds_changed else self._changed
        with milvus_errors(self.location):
            for artist in sorted(self._deleted):
                self.client.delete(self.name, filter=f"artist == {_literal(artist)}")
                self.client.delete(self.name + ARTISTS_SUFFIX, ids=[artist_key(artist)])
            next_id = int(self.meta["next_id"])
            for vectors, names, paths in self._inserted:
                next_id = _insert(self.client, self.name, next_id, [(vectors, names, paths)])
            _write_artists(self, sorted(artists))
            index = self.meta["index"]
            if index["type"] == "FLAT" and self.size > index["exact_limit"]:
                index = _rebuild_index(self.client, self.name, index_for(self.size, index["exact_limit"]))
            self.meta = _write_meta(self.client, self.name, self, index, next_id, int(self.meta["revision"]) + 1)
        self._deleted, self._inserted, self._changed = set(), [], set()
        self._saved_thresholds = (self.unknown_threshold, self.artist_thresholds)


class _Tally:
    """Per-artist sums of unit vectors (float64) and counts, block by block, for the artists ``names``."""

    def __init__(self, names: list[str], dim: int):
        self.position = {a: i for i, a in enumerate(names)}
        self.sums, self.counts = np.zeros((len(names), dim), np.float64), np.zeros(len(names), np.int64)

    def add(self, vectors: np.ndarray, artists: list[str]) -> None:
        ids = np.fromiter((self.position[a] for a in artists), np.int64, len(artists))
        self.sums += artist_sums([(vectors, ids)], len(self.sums), vectors.shape[1])
        self.counts += np.bincount(ids, minlength=len(self.counts))


def _insert(client: MilvusClient, name: str, next_id: int, blocks: Iterable[tuple[np.ndarray, list, list]],
            tally: _Tally | None = None) -> int:
    """Insert reference blocks ``WRITE_ROWS`` rows at a time with ids from ``next_id`` (counted into ``tally``
    when given); returns the next free id."""
    for vectors, artists, paths in blocks:
        if tally is not None:
            tally.add(vectors, artists)
        for start in range(0, len(vectors), WRITE_ROWS):
            stop = min(start + WRITE_ROWS, len(vectors))
            client.insert(name, [{"id": next_id + i, "artist": artists[row], "path": paths[row],
                                  "vector": vectors[row]} for i, row in enumerate(range(start, stop))])
            next_id += stop - start
    return next_id


def _write_artists(gallery: BaseGallery, which: list[str]) -> None:
    """Upsert the rows of NAME__artists of the artists ``which``."""
    client, name = connect(gallery.location)
    position = {a: i for i, a in enumerate(gallery.artist_names)}
    counts, own = gallery.image_counts(), gallery.artist_thresholds or {}
    for start in range(0, len(which), WRITE_ROWS):
        rows = [{"id": artist_key(a), "artist": a, "prototype": gallery.prototypes[position[a]], "images": counts[a],
                 "threshold": float(own.get(a, 0.0)), "calibrated": a in own} for a in which[start:start + WRITE_ROWS]]
        client.upsert(name + ARTISTS_SUFFIX, rows)


def _write_meta(client: MilvusClient, name: str, gallery: BaseGallery, index: dict[str, Any], next_id: int,
                revision: int) -> dict[str, Any]:
    meta = {"format": FORMAT, "version": VERSION, "store": "milvus", "model": gallery.model,
            "feature_dim": gallery.dim, "num_vectors": gallery.size, "unknown_threshold": gallery.unknown_threshold,
            "calibration": gallery.calibration, "index": index, "next_id": next_id, "revision": revision}
    client.alter_collection_properties(name, properties={META_PROPERTY: json.dumps(meta, ensure_ascii=False)})
    return meta


def _rebuild_index(client: MilvusClient, name: str, index: dict[str, Any]) -> dict[str, Any]:
    client.release_collection(name)
    client.drop_index(name, "vector")
    client.create_index(name, _index_params(client, "vector", index))
    client.load_collection(name)
    return index


def drop(location: str) -> None:
    """Drop the collections of the gallery at ``location``."""
    client, name = connect(location)
    with milvus_errors(location):
        for collection in (name, name + ARTISTS_SUFFIX):
            if client.has_collection(collection):
                client.drop_collection(collection)


def create(location: str, model: dict[str, Any], dim: int, artist_names: list[str], blocks: Blocks, count: int,
           exact_limit: int = EXACT_LIMIT, thresholds: tuple[float | None, dict | None] = (None, None),
           calibration: dict | None = None, replace: bool = False) -> MilvusGallery:
    """New collections at ``location`` holding ``blocks`` (``count`` references of ``artist_names``); prototypes
    are summed while inserting, and the metadata is written last. An existing gallery is dropped only with
    ``replace``."""
    client, name = connect(location)
    with milvus_errors(location):
        if client.has_collection(name) or client.has_collection(name + ARTISTS_SUFFIX):
            if not replace:
                raise UserError(f"Milvus at {location} holds a collection {name!r} already; pass another URI#NAME, "
                                "or drop it (tools/gallery_copy.py --replace)")
            drop(location)
        references, artists = _schemas(client, dim)
        index = index_for(count, exact_limit)
        client.create_collection(name, schema=references, index_params=_index_params(client, "vector", index),
                                 consistency_level="Strong")
        client.create_collection(name + ARTISTS_SUFFIX, schema=artists, consistency_level="Strong",
                                 index_params=_index_params(client, "prototype", {"type": "FLAT"}))
        tally = _Tally(artist_names, dim)
        next_id = _insert(client, name, 0, blocks, tally)
        meta = {"model": model, "feature_dim": dim, "unknown_threshold": thresholds[0], "calibration": calibration,
                "index": index, "next_id": next_id, "revision": 0}
        gallery = MilvusGallery(location, meta, artist_names, l2_normalize(tally.sums, "artist prototype"),
                                tally.counts, thresholds[1])
        _write_artists(gallery, artist_names)
        gallery.meta = _write_meta(client, name, gallery, index, next_id, 1)
    return gallery


def open_milvus_gallery(location: str) -> MilvusGallery:
    """The gallery at ``location``, checked; its artists' prototypes, counts and thresholds are read."""
    client, name = connect(location)
    with milvus_errors(location):
        meta = _read_meta(client, name, location)
        for collection in (name, name + ARTISTS_SUFFIX):
            client.load_collection(collection)
        rows = [row for page in _iterate(client, name + ARTISTS_SUFFIX, list(ARTIST_FIELDS)) for row in page]
    if not rows:
        raise UserError(f"gallery {location} has no artists; build it again")
    rows.sort(key=lambda row: row["artist"])
    own = {row["artist"]: float(row["threshold"]) for row in rows if row["calibrated"]}
    return MilvusGallery(location, meta, [row["artist"] for row in rows],
                         _vectors(rows, "prototype", int(meta["feature_dim"])),
                         np.array([row["images"] for row in rows], np.int64), own or None)


def store(gallery: BaseGallery, location: str, replace: bool = False) -> MilvusGallery:
    """Save ``gallery`` at ``location``: its pending changes when it was opened there, else a copy of its stored
    references in new collections."""
    if isinstance(gallery, MilvusGallery) and split_location(gallery.location) == split_location(location):
        gallery.save()
        return gallery
    return create(location, gallery.model, gallery.dim, gallery.artist_names, gallery.blocks(), gallery.size,
                  gallery.exact_limit, (gallery.unknown_threshold, gallery.artist_thresholds), gallery.calibration,
                  replace)
