"""artifacts/outputs.py and artifacts/atomic.py: the inference files, their readers, sets written all or nothing,
one-line write errors, and strict JSON (no bare NaN/Infinity)."""

import errno
import io
import json
import os
import re

import numpy as np
import pytest

import artifacts.atomic as atomic
from artifacts.atomic import OutputSet
from artifacts.outputs import (
    BATCH_RESULTS_FILE,
    FEATURES_FILE,
    NAMES_FILE,
    finite_results,
    load_features,
    load_matrix,
    read_names,
    write_batch_results,
    write_features,
    write_json_file,
)
from utils import UserError

NAMES = ["a/one.png", "画家/two.jpg", "b c.webp"]


def strict_json(path):
    """Parse like a strict JSON reader: a bare NaN / Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def write_set(folder, features, names, results=None):
    """The set inference_artist.py writes for a directory: batch_results.json, features.npy, image_names.txt."""
    results = results or {name: {"features": row.tolist()} for name, row in zip(names, features, strict=True)}
    with OutputSet(folder) as out:
        count = write_batch_results(out, {"mode": "cluster"}, results.items(), len(results), [])
        write_features(out, names, features)
    return count


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_set_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float64)
    assert write_set(tmp_path, features, NAMES) == 0
    loaded, names = load_features(tmp_path / FEATURES_FILE, tmp_path / NAMES_FILE)
    assert loaded.dtype == np.float32 and names == NAMES
    np.testing.assert_array_equal(loaded, features.astype(np.float32))
    report = strict_json(tmp_path / BATCH_RESULTS_FILE)
    assert report["mode"] == "cluster" and report["num_images"] == 3 and report["num_nonfinite"] == 0
    assert list(report["results"]) == NAMES and report["skipped"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([BATCH_RESULTS_FILE, FEATURES_FILE, NAMES_FILE])


class FullDisk(io.FileIO):
    """A real new file on a disk that fills up after ``budget`` bytes: a write beyond it raises ENOSPC like the
    kernel's write."""

    budget = 0

    def write(self, data):
        if len(data) > FullDisk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FullDisk.budget -= len(data)
        return super().write(data)


@pytest.mark.parametrize(("budget", "failing"), [(0, BATCH_RESULTS_FILE), (1000, FEATURES_FILE)])
def test_full_disk_keeps_the_previous_set(tmp_path, monkeypatch, budget, failing):
    """Disk full while writing the first or a later file of the set: one-line error naming it, old set intact."""
    write_set(tmp_path, np.ones((2, 8), np.float32), NAMES[:2])
    before = snapshot(tmp_path)
    FullDisk.budget = budget  # batch_results.json (about 200 bytes) fits in 1000, features.npy (3 KB) does not
    monkeypatch.setattr(atomic, "_create_temp", lambda path: io.BufferedWriter(FullDisk(path, "x")))
    with pytest.raises(UserError) as info:
        write_set(tmp_path, np.zeros((3, 256), np.float32), NAMES, {name: {} for name in NAMES})
    message = str(info.value)
    assert message.startswith(f"cannot write {tmp_path / failing} (No space left on device); free some disk space")
    assert "\n" not in message
    assert snapshot(tmp_path) == before  # the old complete set, no temporary files left


@pytest.mark.parametrize(("code", "hint"), [(errno.EACCES, "permissions"), (errno.EROFS, "read-only")])
def test_unwritable_folder_is_one_line(tmp_path, monkeypatch, code, hint):
    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(atomic, "_create_temp", refuse)
    with pytest.raises(UserError, match=rf"cannot write {re.escape(str(tmp_path / 'preds.json'))} \(.*\); .*{hint}"):
        write_json_file(tmp_path / "preds.json", {"results": {}})
    assert list(tmp_path.iterdir()) == []


def test_error_inside_the_set_replaces_nothing(tmp_path):
    write_json_file(tmp_path / "preds.json", {"old": True})
    with pytest.raises(UserError, match="line break"), OutputSet(tmp_path) as out:
        with out.open("preds.json") as f:
            f.write("{}")
        write_features(out, ["ok", "two\nlines"], np.zeros((2, 4)))
    assert [p.name for p in tmp_path.iterdir()] == ["preds.json"]
    assert strict_json(tmp_path / "preds.json") == {"old": True}


def test_non_finite_numbers_become_null_and_are_counted(tmp_path):
    features = np.ones((3, 4), np.float32)
    features[1, 2] = np.nan
    results = {name: {"classification": [{"class_id": 0, "probability": p}], "features": row.tolist()}
               for name, row, p in zip(NAMES, features, [0.5, 0.25, float("inf")], strict=True)}
    assert write_set(tmp_path, features, NAMES, results) == 2
    report = strict_json(tmp_path / BATCH_RESULTS_FILE)
    assert report["num_nonfinite"] == 2
    assert report["results"][NAMES[1]]["features"] == [1.0, 1.0, None, 1.0]
    assert report["results"][NAMES[2]]["classification"][0]["probability"] is None
    assert report["results"][NAMES[0]] == results[NAMES[0]]

    cleaned, count = finite_results({"x": {"all": {"a": float("nan"), "b": 0.5}}, "y": {"all": {"a": 1.0}}})
    assert count == 1 and cleaned == {"x": {"all": {"a": None, "b": 0.5}}, "y": {"all": {"a": 1.0}}}
    assert write_json_file(tmp_path / "one.json", {"value": -float("inf"), "ok": [1.5]})
    assert strict_json(tmp_path / "one.json") == {"value": None, "ok": [1.5]}


# ------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("content, message", [
    (np.array(["a", "b"]), "not real numbers"),
    (np.ones((2, 3, 4)), "expected one vector"),
    (np.zeros((0, 4)), "expected one vector"),
    (np.array([[1.0, np.inf]]), "row 0 contains NaN or infinite"),
])
def test_load_matrix_rejects_bad_arrays(tmp_path, content, message):
    np.save(tmp_path / "v.npy", content)
    with pytest.raises(UserError, match=message):
        load_matrix(tmp_path / "v.npy")


def test_load_matrix_rejects_non_npy(tmp_path):
    (tmp_path / "v.npy").write_text("not numpy")
    with pytest.raises(UserError, match="cannot read"):
        load_matrix(tmp_path / "v.npy")


def test_read_names_handles_bom_crlf_and_rejects_gaps(tmp_path):
    (tmp_path / "crlf.txt").write_bytes("\ufeffé\r\nb c\r\n".encode())
    assert read_names(tmp_path / "crlf.txt") == ["é", "b c"]
    (tmp_path / "gap.txt").write_text("a\n\nc\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is empty"):
        read_names(tmp_path / "gap.txt")


def test_load_features_checks_lengths_and_files(tmp_path):
    np.save(tmp_path / "f.npy", np.ones((3, 4), np.float32))
    (tmp_path / "names.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(UserError, match="has 3 vectors but .* has 2 names"):
        load_features(tmp_path / "f.npy", tmp_path / "names.txt")
    with pytest.raises(UserError, match="does not exist"):
        load_features(tmp_path / "missing.npy", tmp_path / "names.txt")
