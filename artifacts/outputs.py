"""The inference output contract: the files inference writes and the readers of its features.

- ``batch_results.json`` (a directory run of ``inference_artist.py``): the run's metadata, ``num_images``,
  ``num_skipped``, ``results`` (per image name: ``classification`` and/or ``features``), ``skipped`` (``path``,
  ``reason``) and ``num_nonfinite``. Written one image at a time (a million images never build one string).
- ``<stem>_result.json`` (one image): the metadata with its ``classification`` and/or ``features``.
- ``features.npy`` (float32, N x D) with ``image_names.txt`` (UTF-8, line i names row i): read them back with
  :func:`load_features` (or :func:`load_matrix` and :func:`read_names` separately).
- The multi-label predictions file (``predict_artist_multilabel.py --output``): metadata, ``num_nonfinite``,
  ``results`` and ``skipped``.

A directory run streams its batches into a work folder (:mod:`artifacts.work_folder`; :func:`part_data` is a batch's
bytes there) and :func:`write_parts` assembles these files from its parts, a line or a chunk at a time, byte for
byte what the in-memory writers (:func:`write_batch_results`, :func:`write_features`) write.

Every set of files is written through :class:`artifacts.atomic.OutputSet`: a reader sees the old complete set or the
new one, and a failed write is one line naming the file. A directory run's set is renamed into place in the order
``batch_results.json``, ``features.npy``, ``image_names.txt`` (the index of the features last),
``gallery_results.json``.

JSON never holds a bare ``NaN``/``Infinity`` (invalid for most parsers): a non-finite number is written as ``null``
and ``num_nonfinite`` counts the images that had any.
"""

import itertools
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from artifacts.atomic import OutputSet
from artifacts.work_folder import Part
from errors import UserError

BATCH_RESULTS_FILE = "batch_results.json"
FEATURES_FILE = "features.npy"
NAMES_FILE = "image_names.txt"
GALLERY_RESULTS_FILE = "gallery_results.json"


def result_file_name(image: str | os.PathLike) -> str:
    """The name of one image's result file: ``<stem>_result.json``."""
    return f"{Path(image).stem}_result.json"


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder if needed; a folder that cannot be created or written to is a UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {path} ({err.strerror}); pass another --output") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory {path} is not writable; pass another --output")
    return path


# --------------------------------------------------------------------------------------------- JSON


def _nulled(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-Infinity) replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _nulled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(item) for item in value]
    return value


def finite_json(value: Any, indent: int | None = None) -> tuple[str, bool]:
    """Strict JSON of ``value`` with non-finite numbers as ``null``, and whether there were any."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent), False
    except ValueError:  # a NaN or infinity somewhere: the rare path walks the whole value
        return json.dumps(_nulled(value), ensure_ascii=False, allow_nan=False, indent=indent), True


def finite_results(results: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Per-image ``results`` with non-finite numbers as None, and the number of images that had any."""
    cleaned, count = {}, 0
    for name, entry in results.items():
        nulled = finite_json(entry)[1]
        cleaned[name] = _nulled(entry) if nulled else entry
        count += nulled
    return cleaned, count


def write_json(out: OutputSet, name: str, record: dict[str, Any]) -> bool:
    """Write ``record`` as indented strict JSON into the set ``out``; returns whether non-finite numbers were nulled."""
    text, nulled = finite_json(record, indent=2)
    with out.open(name) as f:
        f.write(text + "\n")
    return nulled


def write_json_file(path: str | os.PathLike, record: dict[str, Any]) -> bool:
    """:func:`write_json` of one file on its own (replaced atomically); returns whether numbers were nulled."""
    path = Path(path)
    with OutputSet(path.parent) as out:
        return write_json(out, path.name, record)


def json_member(name: str, entry: Any) -> tuple[str, bool]:
    """``"name": {...}``, one image's line of ``batch_results.json`` (compact strict JSON), and whether numbers were
    nulled."""
    text, nulled = finite_json(entry)
    return f"{finite_json(name)[0]}: {text}", nulled


def _nested(value: Any, indent: int, level: int) -> str:
    """``value`` as ``json.dumps(..., indent=indent)`` renders it ``level`` levels deep (JSON text holds no raw line
    breaks, so each of them is an indentation point)."""
    return finite_json(value, indent)[0].replace("\n", "\n" + " " * indent * level)


def write_batch_results(out: OutputSet, metadata: dict[str, Any], entries: Iterable[tuple[str, dict[str, Any]]],
                        num_images: int, skipped: list[dict[str, str]]) -> int:
    """Stream ``batch_results.json`` into the set ``out``, one ``(name, entry)`` at a time.

    Returns the number of images with non-finite numbers (written as null; also stored as ``num_nonfinite``).
    """
    members = (json_member(name, entry) for name, entry in entries)
    return write_batch_members(out, metadata, members, num_images, skipped, len(skipped))


def write_batch_members(out: OutputSet, metadata: dict[str, Any], members: Iterable[tuple[str, bool]],
                        num_images: int, skipped: Iterable[dict[str, str]], num_skipped: int,
                        nonfinite: int = 0) -> int:
    """:func:`write_batch_results` from rendered :func:`json_member` lines (with their nulled flags; ``nonfinite``
    counts nulled images not flagged there). Returns the number of images with non-finite numbers."""
    with out.open(BATCH_RESULTS_FILE) as f:
        f.write("{\n")
        for key, value in {**metadata, "num_images": num_images, "num_skipped": num_skipped}.items():
            f.write(f"  {finite_json(key)[0]}: {finite_json(value)[0]},\n")
        f.write('  "results": {')
        for i, (text, nulled) in enumerate(members):
            nonfinite += nulled
            f.write(f"{',' if i else ''}\n    {text}")
        f.write('\n  },\n  "skipped": [')
        count = 0
        for count, item in enumerate(skipped, start=1):  # as json.dumps(skipped, indent=4) writes it
            f.write(f"{',' if count > 1 else ''}\n    {_nested(item, 4, 1)}")
        f.write(f'{chr(10) if count else ""}],\n  "num_nonfinite": {nonfinite}\n}}\n')
    return nonfinite


def write_gallery_results(out: OutputSet, head: dict[str, Any], members: Iterable[tuple[str, Any]]) -> None:
    """``gallery_results.json`` into the set ``out``: ``head`` and ``results`` (per image name: its gallery entry)
    streamed one image at a time, byte for byte as ``json.dumps({**head, "results": ...}, indent=2)``."""
    with out.open(GALLERY_RESULTS_FILE) as f:
        f.write("{")
        for key, value in head.items():
            f.write(f"\n  {finite_json(key)[0]}: {_nested(value, 2, 1)},")
        f.write('\n  "results": {')
        count = 0
        for count, (name, entry) in enumerate(members, start=1):
            f.write(f"{',' if count > 1 else ''}\n    {finite_json(name)[0]}: {_nested(entry, 2, 2)}")
        f.write(f'{chr(10) + "  " if count else ""}}}\n}}\n')


# --------------------------------------------------------------------------------------------- features


def _check_name(name: str) -> None:
    if not name or "\n" in name or "\r" in name:
        raise UserError(f"image name {name!r} is empty or holds a line break; it cannot go in {NAMES_FILE}")


def write_features(out: OutputSet, names: list[str], features: np.ndarray) -> None:
    """``features.npy`` (float32, N x D) and, after it, ``image_names.txt`` (line i names row i), into ``out``."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(names):
        raise ValueError(f"features of shape {features.shape} do not match {len(names)} names")
    for name in names:
        _check_name(name)
    rows = (features[i:i + 4096].astype(np.float32).tobytes() for i in range(0, len(features), 4096))
    write_streamed_features(out, features.shape, rows, names)


def write_streamed_features(out: OutputSet, shape: tuple[int, int], rows: Iterable[bytes],
                            names: Iterable[str]) -> None:
    """``features.npy`` of ``shape`` from raw float32 ``rows`` (bytes, any chunking) and ``image_names.txt`` from
    ``names``, into ``out``: the bytes ``np.save`` writes, without the array in memory."""
    with out.open(FEATURES_FILE, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": tuple(int(n) for n in shape)}
        # Only ``write``: given a real file, numpy writes with C calls whose error drops the reason ("No space left
        # on device"); through Python's write the OSError keeps it.
        np.lib.format.write_array_header_1_0(SimpleNamespace(write=f.write), header)
        written = sum(f.write(chunk) for chunk in rows)
    if written != shape[0] * shape[1] * 4:
        raise ValueError(f"{written} bytes of features do not make a {shape[0]} x {shape[1]} float32 array")
    with out.open(NAMES_FILE) as f:
        f.writelines(f"{name}\n" for name in names)


# --------------------------------------------------------------------------------------------- streamed runs


PART_FEATURES, PART_NAMES, PART_RESULTS, PART_GALLERY, PART_SKIPPED = (
    "features.f32", "names.txt", "results.jsonl", "gallery.jsonl", "skipped.jsonl")


def part_data(names: list[str], features: np.ndarray | None, skipped: list[dict[str, str]],
              entries: Iterable[dict[str, Any]] | None = None,
              gallery: list[dict[str, Any]] | None = None) -> tuple[dict[str, bytes], dict[str, int]]:
    """One batch as the bytes a work folder part appends (:mod:`artifacts.work_folder`): raw float32 feature rows,
    names, ``batch_results.json`` lines (``entries``), gallery entries and skipped files, with its counters."""
    for name in names:
        _check_name(name)
    data = {PART_NAMES: "".join(f"{name}\n" for name in names).encode(),
            PART_SKIPPED: "".join(finite_json(item)[0] + "\n" for item in skipped).encode()}
    counters = {"nonfinite": 0}
    if features is not None:
        data[PART_FEATURES] = np.ascontiguousarray(features, np.float32).tobytes()
    if entries is not None:
        members = [json_member(name, entry) for name, entry in zip(names, entries, strict=True)]
        counters["nonfinite"] = sum(nulled for _, nulled in members)
        data[PART_RESULTS] = "".join(text + "\n" for text, _ in members).encode()
    if gallery is not None:
        counters["unknown"] = sum(bool(entry.get("unknown")) for entry in gallery)
        data[PART_GALLERY] = "".join(finite_json([name, entry])[0] + "\n"
                                     for name, entry in zip(names, gallery, strict=True)).encode()
    return data, counters


def _check_disk(output_dir: Path, parts: list[Part]) -> None:
    """Refuse (one line) to assemble outputs that the disk cannot hold, before writing any of them."""
    sizes = [part.progress.sizes for part in parts]
    # The files keep the parts' sizes, but gallery entries spread over lines (about 3x) and results gain indents.
    need = sum(sum(s.values()) + 2 * s.get(PART_GALLERY, 0) + 5 * s.get(PART_RESULTS, 0) // 100 for s in sizes)
    free = shutil.disk_usage(output_dir).free
    if need > free:
        raise UserError(f"the outputs need about {need / 2**30:.2f} GiB in {output_dir}, which has "
                        f"{free / 2**30:.2f} GiB free; free some space, then run the same command with --resume (the "
                        f"results computed so far stay in {parts[0].folder.parent})")


def write_parts(output_dir: str | os.PathLike, parts: list[Part], metadata: dict[str, Any],
                skipped_before: list[dict[str, str]], feature_dim: int | None,
                gallery_head: dict[str, Any] | None = None) -> tuple[list[str], int]:
    """Assemble a streamed run's parts (in order) into its outputs, as one set: ``batch_results.json`` (after the
    ``skipped_before`` files, those of the parts), with ``feature_dim`` ``features.npy`` + ``image_names.txt``,
    with ``gallery_head`` ``gallery_results.json``. Returns the file names and the count of non-finite images."""
    _check_disk(Path(output_dir), parts)
    rows = sum(part.progress.rows for part in parts)
    skipped = itertools.chain(skipped_before, (json.loads(line) for part in parts for line in part.lines(PART_SKIPPED)))
    num_skipped = len(skipped_before) + sum(part.progress.done - part.progress.rows for part in parts)
    members = ((line, False) for part in parts for line in part.lines(PART_RESULTS))
    nonfinite = sum(part.progress.counters.get("nonfinite", 0) for part in parts)
    written = [BATCH_RESULTS_FILE]
    with OutputSet(output_dir) as out:
        write_batch_members(out, metadata, members, rows, skipped, num_skipped, nonfinite)
        if feature_dim is not None:
            write_streamed_features(out, (rows, feature_dim),
                                    (chunk for part in parts for chunk in part.chunks(PART_FEATURES)),
                                    (name for part in parts for name in part.lines(PART_NAMES)))
            written += [FEATURES_FILE, NAMES_FILE]
        if gallery_head is not None:
            write_gallery_results(out, gallery_head,
                                  (json.loads(line) for part in parts for line in part.lines(PART_GALLERY)))
            written.append(GALLERY_RESULTS_FILE)
    return written, nonfinite


def load_matrix(path: str | os.PathLike) -> np.ndarray:
    """Load a ``.npy`` of one vector (D) or several (N x D) as a float N x D matrix; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"vector file {path} does not exist; pass a .npy file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"cannot read {path} as a .npy array ({err}); save vectors with numpy.save") from None
    if not isinstance(arr, np.ndarray):
        raise UserError(f"{path} is an .npz archive, not a single array; save one array per .npy file")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise UserError(f"{path} holds {arr.dtype} values, not real numbers; save float feature vectors")
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise UserError(f"{path} has shape {arr.shape}; expected one vector (D) or a non-empty N x D matrix")
    if arr.ndim == 1:
        arr = arr[None]
    arr = arr.astype(np.result_type(arr.dtype, np.float32), copy=False)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise UserError(f"{path} row {int(np.argmax(bad))} contains NaN or infinite values; re-extract the features")
    return arr


def read_names(path: str | os.PathLike) -> list[str]:
    """Read a UTF-8 names file, one name per line (row i of a matrix <-> line i); empty lines are errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"names file {path} does not exist; pass the {NAMES_FILE} written with the features")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"names file {path} is not UTF-8 text; save it as UTF-8") from None
    names = [line.removesuffix("\r") for line in text.split("\n")]
    if names and names[-1] == "":
        names.pop()
    for i, name in enumerate(names):
        if not name:
            raise UserError(f"names file {path} line {i + 1} is empty; every line must name one vector")
    return names


def load_features(features_path: str | os.PathLike, names_path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Load saved features (N x D ``.npy``) and their names file, checking that they agree line for line."""
    features, names = load_matrix(features_path), read_names(names_path)
    if len(names) != len(features):
        raise UserError(f"{features_path} has {len(features)} vectors but {names_path} has {len(names)} names; "
                        "they must match line for line (pass the two files written together)")
    return features, names
