"""prepare_dataset.py end to end on generated trees: rejection, split, safety of source and output."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import imagegen as gen
import pytest
from torchvision.datasets import ImageFolder

import prepare_dataset
from data.class_mapping import read_class_mapping
from data.prepare import _destinations, val_count
from data.scan import CACHE_FILE, ScanCache
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
HOKUSAI = "葛飾北斎"
MONET = "Claude Monet (1840)"
SIZE = (16, 12)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Four usable artists (one Japanese, one with spaces and parentheses), one with too few images, a hidden
    folder, and one artist holding every awkward file kind."""
    root = tmp_path_factory.mktemp("src") / "artists"
    gen.artist_folders(root, {"Alice": 12, "Bob": 10, MONET: 10, "Tiny": 3, ".hidden": 12}, SIZE)
    for i in range(10):
        gen.noise_image(root / HOKUSAI / f"富士山 {i}.png", SIZE, seed=500 + i)
    alice = root / "Alice"
    gen.noise_image(alice / "sub1" / "dup.png", SIZE, seed=1)
    gen.noise_image(alice / "sub2" / "deeper" / "dup.png", SIZE, seed=2)
    gen.truncated_jpeg(alice / "truncated.jpg")
    gen.empty_file(alice / "empty.png")
    gen.text_file(alice / "notes.JPG")
    gen.cmyk_jpeg(alice / "cmyk.jpg")
    gen.gray16_png(alice / "gray16.png")
    gen.palette_transparent_png(alice / "palette.png")
    gen.exif_rotated_jpeg(alice / "rotated.jpeg")
    gen.text_file(alice / "readme.txt")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``root``: content hash and mtime."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def split_listing(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for split in ("train", "val") for p in (out / split).rglob("*")
                  if not p.is_dir())


def run(source: Path, out: Path, *extra: str) -> None:
    prepare_dataset.main(["--source-dir", str(source), "--output-dir", str(out), "--workers", "0", *extra])


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    before = snapshot(source)
    out = tmp_path_factory.mktemp("out") / "artist_dataset"
    prepare_dataset.main(["--source-dir", str(source), "--output-dir", str(out), "--workers", "2", "--seed", "3"])
    assert snapshot(source) == before, "the source tree changed"
    return out


def test_rejects_broken_files_with_reasons(prepared):
    info = json.loads((prepared / "dataset_info.json").read_text("utf-8"))
    rejected = {r["path"]: r["reason"].split(":")[0] for r in info["rejected_files"]}
    assert rejected == {"Alice/truncated.jpg": "truncated", "Alice/empty.png": "empty file",
                        "Alice/notes.JPG": "not an image"}
    assert info["totals"]["rejected_files"] == 3
    assert info["totals"]["ignored_files"] == 1  # readme.txt
    split_info = (prepared / "split_info.txt").read_text("utf-8")
    assert "Alice/truncated.jpg: truncated" in split_info and "Tiny" in split_info


def test_classes_and_mapping_match_imagefolder(prepared):
    names = read_class_mapping(prepared / "class_mapping.csv")
    assert names == ["Alice", "Bob", MONET, HOKUSAI]  # Tiny skipped, .hidden ignored
    assert json.loads((prepared / "class_names.json").read_text("utf-8")) == names
    for split in ("train", "val"):
        assert ImageFolder(str(prepared / split)).class_to_idx == {name: i for i, name in enumerate(names)}
    assert (prepared / "class_mapping.csv").read_text("utf-8").splitlines()[0] == "class_id,class_name"


def test_split_counts_skips_and_odd_images(prepared):
    info = json.loads((prepared / "dataset_info.json").read_text("utf-8"))
    alice = info["classes"]["Alice"]
    # 12 plain + 2 nested duplicates + CMYK, 16-bit, palette and EXIF-rotated images
    assert (alice["valid_images"], alice["train"], alice["val"]) == (18, 14, 4)
    assert {c: (v["train"], v["val"]) for c, v in info["classes"].items() if c != "Alice"} == {
        "Bob": (8, 2), MONET: (8, 2), HOKUSAI: (8, 2)}
    assert [s["class_name"] for s in info["skipped_classes"]] == ["Tiny"]
    assert info["totals"] == {"train": 38, "val": 10, "images": 48, "rejected_files": 3, "skipped_classes": 1,
                              "ignored_files": 1}
    assert info["seed"] == 3 and info["arguments"]["val_ratio"] == 0.2
    files = split_listing(prepared)
    alice_files = {f.split("/", 2)[2] for f in files if f.split("/")[1] == "Alice"}
    assert {"sub1/dup.png", "sub2/deeper/dup.png", "cmyk.jpg", "gray16.png", "palette.png",
            "rotated.jpeg"} <= alice_files
    assert sum(f.split("/")[1] == HOKUSAI and "富士山" in f for f in files) == 10
    assert not (prepared / ".prepare_dataset.tmp").exists()


def test_split_is_deterministic_per_seed(source, prepared, tmp_path):
    run(source, tmp_path / "same", "--seed", "3")
    run(source, tmp_path / "other", "--seed", "4")
    assert split_listing(tmp_path / "same") == split_listing(prepared)
    assert split_listing(tmp_path / "other") != split_listing(prepared)


def test_rerun_without_yes_refuses_and_with_yes_replaces_only_its_own_files(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run(source, out, "--min-images", "12")
    assert read_class_mapping(out / "class_mapping.csv") == ["Alice"]
    (out / "notes.txt").write_text("mine")
    gen.noise_image(out / "checkpoints" / "keep.png")
    gen.noise_image(out / "train" / "Alice" / "stale.png")
    mine = snapshot(out / "checkpoints")

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal
    with pytest.raises(UserError, match="--yes"):
        run(source, out)
    assert (out / "train" / "Alice" / "stale.png").exists()

    run(source, out, "--yes")
    assert read_class_mapping(out / "class_mapping.csv") == ["Alice", "Bob", MONET, HOKUSAI]
    assert not (out / "train" / "Alice" / "stale.png").exists()
    assert (out / "notes.txt").read_text() == "mine" and snapshot(out / "checkpoints") == mine
    assert "Next, train with:" in capsys.readouterr().out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_asks_before_replacing(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(source, out, "--min-images", "12")
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    with pytest.raises(UserError, match="cancelled"):
        run(source, out)
    assert read_class_mapping(out / "class_mapping.csv") == ["Alice"]
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    run(source, out)
    assert len(read_class_mapping(out / "class_mapping.csv")) == 4


def test_cli_without_terminal_prints_one_line_error(source, prepared):
    result = subprocess.run(
        [sys.executable, str(REPO / "prepare_dataset.py"), "--source-dir", str(source), "--output-dir", str(prepared)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/",
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "--yes" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_output_inside_source_and_source_inside_output(source, tmp_path):
    with pytest.raises(UserError, match="inside the source dir"):
        run(source, source / "Bob" / "out")
    with pytest.raises(UserError, match="inside the source dir"):
        run(source, source)
    nested = gen.artist_folders(tmp_path / "ds" / "train", {"a": 2})
    with pytest.raises(UserError, match="replaces"):
        run(nested, tmp_path / "ds")
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "missing", tmp_path / "o")


@pytest.mark.parametrize("mode", ["--symlink", "--hardlink"])
def test_link_modes(tmp_path, mode):
    src = gen.artist_folders(tmp_path / "src", {"a": 3, "b": 3}, SIZE)
    out = tmp_path / "out"
    run(src, out, mode, "--min-images", "1")
    placed = [p for split in ("train", "val") for p in (out / split).rglob("*.png")]
    assert len(placed) == 6
    for p in placed:
        original = src / p.parent.name / p.name
        if mode == "--symlink":
            assert p.is_symlink() and p.resolve() == original.resolve()
        else:
            assert not p.is_symlink() and p.stat().st_ino == original.stat().st_ino


def test_max_images_per_class_and_zero_val_ratio(tmp_path):
    src = gen.artist_folders(tmp_path / "src", {"a": 10, "b": 4}, SIZE)
    run(src, tmp_path / "out", "--max-images-per-class", "5", "--val-ratio", "0", "--min-images", "1")
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert {c: (v["train"], v["val"]) for c, v in info["classes"].items()} == {"a": (5, 0), "b": (4, 0)}
    assert (tmp_path / "out" / "val").is_dir() and not any((tmp_path / "out" / "val").iterdir())


def test_every_class_with_two_images_gets_a_val_image(tmp_path):
    src = gen.artist_folders(tmp_path / "src", {"a": 2, "b": 3, "c": 1}, SIZE)
    run(src, tmp_path / "out", "--min-images", "1", "--val-ratio", "0.1")
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert {c: (v["train"], v["val"]) for c, v in info["classes"].items()} == {"a": (1, 1), "b": (2, 1), "c": (1, 0)}


def test_no_usable_class_is_an_error(tmp_path):
    src = gen.artist_folders(tmp_path / "src", {"a": 2}, SIZE)
    with pytest.raises(UserError, match="lower --min-images"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists()


def test_val_count():
    assert [val_count(n, 0.2) for n in (0, 1, 2, 3, 10, 12, 100)] == [0, 0, 1, 1, 2, 2, 20]
    assert val_count(10, 0) == 0 and val_count(3, 0.9) == 2


def test_names_differing_only_by_case_get_distinct_destinations():
    assert _destinations(["X.png", "sub/a.png", "x.png"]) == ["X.png", "sub/a.png", "x (1).png"]
    assert len({d.lower() for d in _destinations(["A.jpg", "a.jpg", "a (1).jpg"])}) == 3


def test_cache_for_training_is_written(prepared):
    entries = ScanCache(prepared / CACHE_FILE, prepared).load()
    assert len(entries) == 48
    key = next(iter(entries))
    stat = os.stat(prepared / key)
    assert entries[key] == (stat.st_size, stat.st_mtime_ns, None)
