"""``class_mapping.csv``: the one reader, writer and comparison of class id -> class name, shared by every script.

Format: UTF-8, header ``class_id,class_name``, one row per class, ids 0..n-1 (the sorted order torchvision's
``ImageFolder`` uses for folder names). Names are quoted by the csv module when they hold commas or quotes.
"""

import csv
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from errors import UserError

__all__ = ["CLASS_MAPPING_FILE", "compare_class_mappings", "control_characters", "read_class_mapping",
           "write_class_mapping"]

CLASS_MAPPING_FILE = "class_mapping.csv"
HEADER = ["class_id", "class_name"]


def write_class_mapping(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """Write ``class_names`` (index = class id) to ``path`` as ``class_id,class_name`` rows."""
    names = list(class_names)
    _check_names(names, str(path))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(enumerate(names))


def read_class_mapping(path: str | os.PathLike) -> list[str]:
    """Read and validate a class mapping; return the class names indexed by class id.

    Raises:
        UserError: missing file, wrong header, bad or duplicate ids, ids not exactly 0..n-1, empty or duplicate
            names; the message names the file and line.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UserError(f"{path} not found; pass the class_mapping.csv written by prepare_dataset.py") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason}); save it as UTF-8") from None
    if not rows or [cell.strip() for cell in rows[0]] != HEADER:
        raise UserError(f"{path}, line 1: expected the header 'class_id,class_name'; add it as the first line")
    by_id: dict[int, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or row == [""]:
            continue
        if len(row) != 2:
            raise UserError(
                f"{path}, line {line}: expected 2 fields (class_id,class_name), got {len(row)}; quote names "
                "that contain commas"
            )
        raw_id, name = row[0].strip(), row[1]
        try:
            class_id = int(raw_id)
        except ValueError:
            raise UserError(f"{path}, line {line}: class_id {raw_id!r} is not an integer") from None
        if class_id in by_id:
            raise UserError(f"{path}, line {line}: class_id {class_id} appears twice")
        by_id[class_id] = name
    names = [by_id[i] for i in sorted(by_id)]
    if sorted(by_id) != list(range(len(by_id))):
        missing = sorted(set(range(max(by_id, default=-1) + 1)) - set(by_id))
        raise UserError(
            f"{path}: class ids must be exactly 0..{len(by_id) - 1}; "
            + (f"missing ids {_preview(missing)}" if missing else "negative ids found")
        )
    _check_names(names, str(path))
    return names


def compare_class_mappings(
    expected: Sequence[str], actual: Sequence[str], expected_label: str = "checkpoint",
    actual_label: str = "dataset", limit: int = 10,
) -> list[str]:
    """Describe how two class lists differ, one line per differing id (at most ``limit``); empty when equal."""
    differences = []
    if len(expected) != len(actual):
        differences.append(f"{len(expected)} classes in the {expected_label}, {len(actual)} in the {actual_label}")
    differing = [
        i for i in range(max(len(expected), len(actual)))
        if i >= len(expected) or i >= len(actual) or expected[i] != actual[i]
    ]
    for i in differing[:limit]:
        left = repr(expected[i]) if i < len(expected) else "(none)"
        right = repr(actual[i]) if i < len(actual) else "(none)"
        differences.append(f"id {i}: {left} in the {expected_label}, {right} in the {actual_label}")
    if len(differing) > limit:
        differences.append(f"... and {len(differing) - limit} more ids differ")
    return differences


def control_characters(name: str) -> list[str]:
    """The control characters (newline, tab, ...) in a class name, escaped (``["\\n"]``); such names break the
    line-based files and listings of a run, so they are refused."""
    return sorted({repr(c)[1:-1] for c in name if unicodedata.category(c) == "Cc"})


def _check_names(names: list[str], source: str) -> None:
    seen: set[str] = set()
    for class_id, name in enumerate(names):
        if not name.strip():
            raise UserError(f"{source}: class {class_id} has an empty name; every class needs a name")
        if control_characters(name):
            raise UserError(f"{source}: class name {name!r} contains control characters "
                            f"({' '.join(control_characters(name))}); rename the folder / label")
        if name in seen:
            raise UserError(f"{source}: class name {name!r} appears twice; class names must be unique")
        seen.add(name)


def _preview(items: list, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")
