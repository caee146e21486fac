"""Multi-label annotations: label syntax, CSV errors with line numbers, targets, and the two CSV tools."""

from pathlib import Path

import imagegen as gen
import pytest
import torch

from data.multilabel import (
    MultiLabelImageDataset,
    format_labels,
    parse_labels,
    read_multilabel_csv,
    split_multilabel_rows,
    write_multilabel_csv,
)
from tools import generate_multilabel_csv, split_multilabel_dataset
from utils import UserError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(re:zero:1.4)", {"re:zero": 1.4}),
        ("re:zero", {"re:zero": 1.0}),
        ("a, b ,c", {"a": 1.0, "b": 1.0, "c": 1.0}),
        ("(a:0.5), b, (a:0.25)", {"a": 0.75, "b": 1.0}),
        ("a, a", {"a": 2.0}),
        ("( spaced name : 2 ),", {"spaced name": 2.0}),
        ("(unknown)", {"(unknown)": 1.0}),
        ("宮崎駿, (新海誠:3)", {"宮崎駿": 1.0, "新海誠": 3.0}),
    ],
)
def test_parse_labels(text, expected):
    assert parse_labels(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, message", [
    ("(a:-1)", "positive"), ("(a:0)", "positive"), ("(a:x)", "not a number"), ("(re:zero)", "not a number"),
    ("(:2)", "no label name"), (" , ", "empty labels"), ("(a:nan)", "positive"),
])
def test_parse_label_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_labels(text)


def test_custom_delimiter_and_format_round_trip():
    labels = parse_labels("a b; (c:d:2.5); (x)", delimiter=";")
    assert labels == {"a b": 1.0, "c:d": 2.5, "(x)": 1.0}
    assert parse_labels(format_labels(labels, ";"), ";") == labels
    assert format_labels({"a": 1.0, "b": 2.0, "c": 0.5}) == "a,(b:2),(c:0.5)"
    with pytest.raises(ValueError, match="delimiter"):
        format_labels({"a,b": 1.0})


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_csv_quoting_unquoted_labels_and_blank_lines(tmp_path):
    csv_path = write(tmp_path / "a.csv", 'image_path,labels\n"x 1.png","cat,(dog:2)"\n\ny.png,cat,bird\n'
                                         '"z,3.png",(re:zero:1.4)\n')
    assert read_multilabel_csv(csv_path) == [
        ("x 1.png", {"cat": 1.0, "dog": 2.0}), ("y.png", {"cat": 1.0, "bird": 1.0}), ("z,3.png", {"re:zero": 1.4})]
    semi = write(tmp_path / "b.csv", "image_path,labels\nx.png,a;(b:2)\n")
    assert read_multilabel_csv(semi, label_delimiter=";") == [("x.png", {"a": 1.0, "b": 2.0})]


@pytest.mark.parametrize("body, line, message", [
    ("a.png,cat\n,dog\n", 3, "missing image_path"),
    ("a.png,cat\nb.png,\n", 3, "empty labels"),
    ("a.png,cat\nb.png\n", 3, "empty labels"),
    ("a.png,cat\n\nb.png,(dog:-2)\n", 4, "positive"),
    ("a.png,(dog:two)\n", 2, "not a number"),
])
def test_malformed_rows_name_file_and_line(tmp_path, body, line, message):
    csv_path = write(tmp_path / "bad.csv", "image_path,labels\n" + body)
    with pytest.raises(UserError, match=message) as info:
        read_multilabel_csv(csv_path)
    assert f"{csv_path}, line {line}:" in str(info.value)


def test_header_is_required(tmp_path):
    with pytest.raises(UserError, match="line 1: expected the header"):
        read_multilabel_csv(write(tmp_path / "h.csv", "a.png,cat\n"))
    with pytest.raises(UserError, match="not found"):
        read_multilabel_csv(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="quote the labels"):
        read_multilabel_csv(write(tmp_path / "s.csv", "image_path,labels\na.png,x,y\n"), label_delimiter=";")


def test_write_then_read_round_trip(tmp_path):
    rows = [("dir/日本 1.png", {"re:zero": 1.4, "cat": 1.0}), ("b.png", {"(x)": 1.0, "a,b:c": 2.0})]
    write_multilabel_csv(tmp_path / "o.csv", rows, label_delimiter="|")
    assert read_multilabel_csv(tmp_path / "o.csv", label_delimiter="|") == rows


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for i in range(4):
        gen.noise_image(root / f"{i}.png", (20, 16), seed=i)
    return root


def test_dataset_targets_are_normalised_per_row(images, tmp_path):
    csv_path = write(tmp_path / "train.csv", "image_path,labels\n0.png,\"cat,dog\"\n"
                     f"{images / '1.png'},\"(cat:2),(dog:1),(bird:0.5)\"\n2.png,\"(cat:0.5),(cat:0.5)\"\n")
    dataset = MultiLabelImageDataset(csv_path, images)
    assert dataset.classes == ["bird", "cat", "dog"] and len(dataset) == 3
    image, target = dataset[0]
    assert image.size == (20, 16) and target.tolist() == [0.0, 1.0, 1.0]
    assert dataset[1][1].tolist() == [0.25, 1.0, 0.5]
    assert dataset[2][1].tolist() == [0.0, 1.0, 0.0]
    assert dataset[0][1].dtype == torch.float32


def test_validation_labels_unknown_to_training_are_reported_and_ignored(images, tmp_path, capsys):
    train = MultiLabelImageDataset(write(tmp_path / "t.csv", "image_path,labels\n0.png,\"a,b\"\n"), images)
    val_csv = write(tmp_path / "v.csv", "image_path,labels\n1.png,\"b,(new:4)\"\n2.png,new\n3.png,a\n")
    val = MultiLabelImageDataset(val_csv, images, classes=train.classes)
    assert val.classes == ["a", "b"] and val.unknown_labels == {"new": 2}
    assert [val[i][1].tolist() for i in range(3)] == [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    out = capsys.readouterr().out
    assert "not in the training classes" in out and "new (2 rows)" in out and "1 rows have no known label" in out


def test_missing_images_are_reported_and_a_wrong_root_is_an_error(images, tmp_path, capsys):
    csv_path = write(tmp_path / "m.csv", "image_path,labels\n0.png,a\nnope.png,b\n")
    assert len(MultiLabelImageDataset(csv_path, images)) == 1
    assert "1 listed images do not exist" in capsys.readouterr().out
    with pytest.raises(UserError, match="check --data-path"):
        MultiLabelImageDataset(csv_path, tmp_path)


def test_unreadable_image_during_an_epoch_is_skipped(images, tmp_path, capsys):
    dataset = MultiLabelImageDataset(write(tmp_path / "e.csv", "image_path,labels\n0.png,a\n1.png,b\n"), images)
    (images / "0.png").write_bytes(b"broken")
    assert dataset[0][1].tolist() == [0.0, 1.0]
    assert "skipping unreadable image" in capsys.readouterr().out


@pytest.fixture
def labelled(tmp_path) -> Path:
    """Images with .txt label files, one nested, one without labels, one with an unusable label file."""
    root = tmp_path / "labelled"
    labels = {"a.png": "cat, dog", "b.jpg": "cat\n(re:zero:1.4)", "c.png": "cat", "d.png": "dog,rare",
              "sub/e.png": "cat", "f.png": "cat,dog", "g.png": "(dog:-1)"}
    for i, (name, text) in enumerate(labels.items()):
        gen.noise_image(root / name, (16, 16), seed=i)
        gen.text_file((root / name).with_suffix(".txt"), text)
    gen.noise_image(root / "unlabelled.png")
    gen.text_file(root / "notes.txt", "not a label file of any image")
    return root


def test_generate_multilabel_csv(labelled, tmp_path, capsys):
    out = tmp_path / "all.csv"
    generate_multilabel_csv.main(["--input-dir", str(labelled), "--output-csv", str(out), "--relative-paths"])
    rows = read_multilabel_csv(out)
    assert [p for p, _ in rows] == ["a.png", "b.jpg", "c.png", "d.png", "f.png"]
    assert rows[1][1] == {"cat": 1.0, "re:zero": 1.4}
    printed = capsys.readouterr().out
    assert "Skipped 1 images without a .txt" in printed and "unlabelled.png" in printed
    assert "g.txt" in printed and "positive" in printed

    with pytest.raises(UserError, match="--yes"):
        generate_multilabel_csv.main(["--input-dir", str(labelled), "--output-csv", str(out)])
    generate_multilabel_csv.main(["--input-dir", str(labelled), "--output-csv", str(out), "--recursive", "--yes"])
    rows = read_multilabel_csv(out)
    assert len(rows) == 6 and Path(rows[-1][0]) == labelled / "sub" / "e.png"
    assert len(MultiLabelImageDataset(out, tmp_path / "anywhere", allow_outside_root=True)) == 6  # absolute paths


def test_split_multilabel_dataset(labelled, tmp_path, capsys):
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    argv = ["--input-dir", str(labelled), "--train-csv", str(train_csv), "--val-csv", str(val_csv), "--val-ratio",
            "0.4", "--min-label-count", "2", "--relative-paths", "--recursive", "--seed", "1"]
    split_multilabel_dataset.main(argv)
    train, val = read_multilabel_csv(train_csv), read_multilabel_csv(val_csv)
    assert (len(train), len(val)) == (4, 2)  # 6 usable images, 40 % -> 2 for validation
    assert sorted(p for p, _ in train + val) == ["a.png", "b.jpg", "c.png", "d.png", "f.png", "sub/e.png"]
    labels = {name for _, row in train + val for name in row}
    assert labels == {"cat", "dog"}, "labels seen once (rare, re:zero) are dropped"
    assert "Dropped 2 labels" in capsys.readouterr().out

    split_multilabel_dataset.main(argv + ["--yes"])
    assert read_multilabel_csv(train_csv) == train, "same seed, same split"
    split_multilabel_dataset.main(argv[:-1] + ["7", "--yes"])
    assert read_multilabel_csv(train_csv) != train, "another seed, another split"


def test_split_rows_drops_rows_left_without_labels():
    rows = [("a", {"x": 1.0}), ("b", {"x": 1.0, "y": 2.0}), ("c", {"z": 1.0}), ("d", {"x": 1.0})]
    train, val, report = split_multilabel_rows(rows, val_ratio=0.25, min_label_count=2, seed=0)
    assert report == {"dropped_labels": ["y", "z"], "dropped_rows": 1, "val_only_labels": []}
    assert len(train) == 2 and len(val) == 1
    assert all(labels == {"x": 1.0} for _, labels in train + val)


def test_split_multilabel_dataset_says_why_no_image_is_labelled(tmp_path):
    """Images without .txt labels name the missing label files (never --recursive when it was given); images only
    in sub-folders suggest --recursive; labels all too rare suggest --min-label-count."""
    gen.noise_image(tmp_path / "images" / "sub" / "a.png")
    gen.noise_image(tmp_path / "images" / "sub" / "b.png")
    argv = ["--input-dir", str(tmp_path / "images"), "--train-csv", str(tmp_path / "t.csv"), "--val-csv",
            str(tmp_path / "v.csv"), "--val-ratio", "0"]
    with pytest.raises(UserError, match=r"no image file in .*images; add --recursive"):
        split_multilabel_dataset.main(argv)
    with pytest.raises(UserError, match=r"or its sub-folders has a usable \.txt label file \(2 without one") as err:
        split_multilabel_dataset.main(argv + ["--recursive"])
    assert "--recursive" not in str(err.value) and "--min-label-count" not in str(err.value)
    (tmp_path / "images" / "sub" / "a.txt").write_text("cat")
    with pytest.raises(UserError, match=r"seen fewer than 2 times; lower --min-label-count$"):
        split_multilabel_dataset.main(argv + ["--recursive", "--min-label-count", "2"])
