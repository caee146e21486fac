"""The inference output contract: the files inference writes and the readers of its features.

- ``batch_results.json`` (a directory run of ``inference_artist.py``): the run's metadata, ``num_images``,
  ``num_skipped``, ``results`` (per image name: ``classification`` and/or ``features``), ``skipped`` (``path``,
  ``reason``) and ``num_nonfinite``. Written one image at a time (a million images never build one string).
- ``<stem>_result.json`` (one image): the metadata with its ``classification`` and/or ``features``.
- ``features.npy`` (float32, N x D) with ``image_names.txt`` (UTF-8, line i names row i): read them back with
  :func:`load_features` (or :func:`load_matrix` and :func:`read_names` separately).
- The multi-label predictions file (``predict_artist_multilabel.py --output``): metadata, ``num_nonfinite``,
  ``results`` and ``skipped``.

Every set of files is written through :class:`artifacts.atomic.OutputSet`: a reader sees the old complete set or the
new one, and a failed write is one line naming the file. A directory run's set is renamed into place in the order
``batch_results.json``, ``features.npy``, ``image_names.txt`` (the index of the features last).

JSON never holds a bare ``NaN``/``Infinity`` (invalid for most parsers): a non-finite number is written as ``null``
and ``num_nonfinite`` counts the images that had any.
"""

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from artifacts.atomic import OutputSet
from errors import UserError

BATCH_RESULTS_FILE = "batch_results.json"
FEATURES_FILE = "features.npy"
NAMES_FILE = "image_names.txt"


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


def write_batch_results(out: OutputSet, metadata: dict[str, Any], entries: Iterable[tuple[str, dict[str, Any]]],
                        num_images: int, skipped: list[dict[str, str]]) -> int:
    """Stream ``batch_results.json`` into the set ``out``, one ``(name, entry)`` at a time.

    Returns the number of images with non-finite numbers (written as null; also stored as ``num_nonfinite``).
    """
    nonfinite = 0
    with out.open(BATCH_RESULTS_FILE) as f:
        f.write("{\n")
        for key, value in {**metadata, "num_images": num_images, "num_skipped": len(skipped)}.items():
            f.write(f"  {finite_json(key)[0]}: {finite_json(value)[0]},\n")
        f.write('  "results": {')
        for i, (name, entry) in enumerate(entries):
            text, nulled = finite_json(entry)
            nonfinite += nulled
            f.write(f"{',' if i else ''}\n    {finite_json(name)[0]}: {text}")
        f.write("\n  },\n")
        f.write(f'  "skipped": {finite_json(skipped, indent=4)[0]},\n')
        f.write(f'  "num_nonfinite": {nonfinite}\n}}\n')
    return nonfinite


# --------------------------------------------------------------------------------------------- features


def write_features(out: OutputSet, names: list[str], features: np.ndarray) -> None:
    """``features.npy`` (float32, N x D) and, after it, ``image_names.txt`` (line i names row i), into ``out``."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(names):
        raise ValueError(f"features of shape {features.shape} do not match {len(names)} names")
    for name in names:
        if not name or "\n" in name or "\r" in name:
            raise UserError(f"image name {name!r} is empty or holds a line break; it cannot go in {NAMES_FILE}")
    with out.open(FEATURES_FILE, "wb") as f:
        # Only ``write``: given a real file, numpy writes the data with C calls whose error drops the reason
        # ("No space left on device"); through Python's write the OSError keeps it.
        np.save(SimpleNamespace(write=f.write), features.astype(np.float32, copy=False))
    with out.open(NAMES_FILE) as f:
        f.writelines(f"{name}\n" for name in names)


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
