"""Odd input fails cleanly when preparing and reading data (issue 14): one class, control characters in class names,
a full output disk, bad numbers, near-limit images, multi-label rows outside the data folder or not images, and
formula-like label names in CSVs meant for spreadsheets."""

import csv
import errno
import shutil
import subprocess
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
import torch
from PIL import ImageFile

import data.images
import data.scan
import prepare_dataset
import train_artist_multilabel
from data import MultiLabelImageDataset
from data.class_mapping import read_class_mapping, write_class_mapping
from data.images import verify_image
from data.scan import verify_images
from utils import UserError


def prepare(source: Path, out: Path, *extra: str) -> None:
    prepare_dataset.main(["--source-dir", str(source), "--output-dir", str(out), "--workers", "0", "--min-images",
                          "2", *extra])


def test_one_class_is_prepared_with_a_warning(tmp_path, capsys):
    gen.artist_folders(tmp_path / "src", {"Solo": 3})
    prepare(tmp_path / "src", tmp_path / "out")
    out = capsys.readouterr().out
    assert "warning: only one class ('Solo') is usable: training needs at least two classes" in out
    assert read_class_mapping(tmp_path / "out" / "class_mapping.csv") == ["Solo"]


def test_class_names_with_control_characters_are_skipped_and_listed_escaped(tmp_path, capsys):
    gen.artist_folders(tmp_path / "src", {"Alice": 2, "Bob": 2, "new\nline": 2, "tab\there": 2})
    prepare(tmp_path / "src", tmp_path / "out")
    assert read_class_mapping(tmp_path / "out" / "class_mapping.csv") == ["Alice", "Bob"]
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["Alice", "Bob"]
    report = (tmp_path / "out" / "split_info.txt").read_text().splitlines()
    assert "'new\\nline': the folder name contains control characters (\\n): rename the folder" in report
    assert "'tab\\there': the folder name contains control characters (\\t): rename the folder" in report
    assert "'new\\nline' (the folder name contains control characters" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"class name 'a\\tb' contains control characters \(\\t\)"):
        write_class_mapping(tmp_path / "m.csv", ["a\tb", "c"])


@pytest.mark.parametrize("way", ["tmpfs", "simulated"])
def test_full_output_disk_names_the_destination(tmp_path, monkeypatch, way):
    source = gen.artist_folders(tmp_path / "src", {"Alice": 6, "Bob": 6}, size=(200, 200))  # ~120 KB each
    out = tmp_path / "out"
    out.mkdir()
    if way == "tmpfs":
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(out)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()[:80]}); see the simulated case")
    else:
        def disk_full(src, dst, **kwargs):  # what sendfile reports: the source first, the destination second
            raise OSError(errno.ENOSPC, "No space left on device", src, None, dst)
        monkeypatch.setattr(shutil, "copy2", disk_full)
    try:
        with pytest.raises(UserError) as err:
            prepare(source, out)
        message = str(err.value)
        assert message.startswith(f"cannot write {out}") and "No space left on device" in message
        assert str(source) not in message and "\n" not in message
        assert not [p for p in out.iterdir()]  # the staging folder is gone
    finally:
        if way == "tmpfs":
            subprocess.run(["umount", str(out)], check=False)


@pytest.mark.parametrize("argv, message", [
    (["--val-ratio", "1.5"], "argument --val-ratio: must be in [0, 1), got 1.5"),
    (["--min-images", "0"], "argument --min-images: must be at least 1, got 0"),
    (["--workers", "-2"], "argument --workers: must be at least 0, got -2"),
    (["--val-ratio", "nan"], "argument --val-ratio: must be a finite number, got nan"),
])
def test_prepare_numeric_flags_are_checked(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        prepare_dataset.main(["--source-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), *argv])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def awkward_files(root: Path) -> list[Path]:
    files = [gen.noise_image(root / "ok.png"), gen.noise_image(root / "ok.jpg", (40, 30)),
             gen.cmyk_jpeg(root / "c.jpg"), gen.gray16_png(root / "g.png"), gen.rgb16_png(root / "rgb16.png"),
             gen.exif_rotated_jpeg(root / "r.jpg"), gen.palette_transparent_png(root / "p.png"),
             gen.rgba_png(root / "a.png"), gen.animated_gif(root / "a.gif"), gen.truncated_jpeg(root / "t.jpg"),
             gen.empty_file(root / "e.png"), gen.text_file(root / "x.jpg")]
    cut = gen.noise_image(root / "cut.png", (64, 64))
    cut.write_bytes(cut.read_bytes()[:-200])
    return [*files, cut]


def test_bounded_verification_agrees_with_a_full_load(tmp_path, monkeypatch):
    """Every file once through the full load and once through the bounded path (forced by a 1-pixel budget)."""
    files = awkward_files(tmp_path)
    full = [verify_image(path) for path in files]
    monkeypatch.setattr(data.images, "VERIFY_FULL_PIXELS", 1)
    bounded = [verify_image(path) for path in files]
    assert [reason is None for reason in bounded] == [reason is None for reason in full]
    assert [r.split(":")[0] for r in bounded if r] == [r.split(":")[0] for r in full if r]
    assert sum(reason is None for reason in bounded) == 9


def test_large_jpeg_is_verified_at_reduced_scale(tmp_path, monkeypatch):
    path = gen.noise_image(tmp_path / "big.jpg", (512, 512))
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def spy(img):
        decoded_sizes.append(img.size)
        return real_load(img)
    monkeypatch.setattr(data.images, "VERIFY_FULL_PIXELS", 1000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    assert verify_image(path) is None and decoded_sizes[0] == (64, 64)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert verify_image(path).startswith(("truncated", "corrupt"))


def test_verifying_processes_are_bounded_by_available_memory(tmp_path, monkeypatch, capsys):
    paths = [gen.noise_image(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    monkeypatch.setattr(data.scan, "available_memory", lambda: 2 * data.scan.WORKER_MEMORY + 5)
    assert data.scan.default_workers() <= 2
    assert verify_images(paths, workers=8, verbose=False) == [None] * 4
    assert "note: verifying with 2 processes instead of 4: the available memory holds 2" in capsys.readouterr().out
    monkeypatch.undo()
    assert data.scan.available_memory() > 0


@pytest.fixture
def labelled(tmp_path) -> Path:
    root = tmp_path / "images"
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        gen.noise_image(root / name, (16, 16), seed=i)
    gen.text_file(root / "fake.jpg")
    gen.noise_image(tmp_path / "outside.png", (16, 16), seed=9)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def test_multilabel_rows_outside_the_root_or_not_images_are_left_out_once(labelled, tmp_path, capsys):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("image_path,labels\na.png,cat\nb.png,\"cat,dog\"\nc.png,dog\n"
                        "../../../../../etc/passwd,=evil\n"
                        f"{tmp_path / 'outside.png'},rare\nlink.png,rare\nfake.jpg,\"cat,rare\"\n"
                        "/proc/self/environ,x\n")
    dataset = MultiLabelImageDataset(csv_path, labelled)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 3
    out = capsys.readouterr().out
    assert "4 listed images lie outside --data-path (pass --allow-outside-root to use them)" in out
    assert "1 listed images are not readable images and are left out" in out and "fake.jpg" in out
    assert out.count("warning:") == 2
    positives, _ = train_artist_multilabel.label_statistics(dataset)
    assert positives.tolist() == [2, 2]
    allowed = MultiLabelImageDataset(csv_path, labelled, allow_outside_root=True, verbose=False)
    assert allowed.classes == ["cat", "dog", "rare"] and len(allowed) == 5  # passwd and environ are no images


def test_label_stats_neutralise_formula_like_names_for_spreadsheets(tmp_path):
    classes = ["=HYPERLINK(1)", "+1", "-x", "@sum", "plain", "a=b"]
    path = tmp_path / "label_stats.csv"
    train_artist_multilabel.write_label_stats(path, classes, np.ones(6), np.ones(6), torch.ones(6))
    with open(path, newline="", encoding="utf-8") as f:
        names = [row[0] for row in csv.reader(f)][1:]
    assert names == ["'=HYPERLINK(1)", "'+1", "'-x", "'@sum", "plain", "a=b"]
