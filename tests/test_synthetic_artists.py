"""Tests for tools/make_synthetic_artists.py: layout, determinism, mixed CSV, and that style, not content, separates."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.style_statistics import style_statistics
from data.multilabel import parse_labels, read_label_file, read_multilabel_csv
from tools.make_synthetic_artists import (
    MIX_ALPHAS,
    MIXED_CSV,
    MIXED_DIR,
    artist_names,
    generate_artists,
    get_args_parser,
    main,
    make_content,
    make_style,
    render,
)

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_artists.py"
NUM_ARTISTS, TRAIN_PER_ARTIST, TEST_PER_ARTIST, SIZE = 8, 12, 6, 64


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255


def _dataset_features(result: dict, colour: bool = True) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for label, name in enumerate(result["artists"]):
        for path in sorted((result["output_dir"] / name).iterdir()):
            x.append(style_statistics(_load(path), colour))
            y.append(label)
    return np.array(x), np.array(y)


def _classifier(x: np.ndarray, y: np.ndarray):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x, y)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    return generate_artists(tmp_path_factory.mktemp("train"), NUM_ARTISTS, TRAIN_PER_ARTIST, SIZE, seed=0,
                            mix=True, num_mixed=40)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    return generate_artists(tmp_path_factory.mktemp("test"), NUM_ARTISTS, TEST_PER_ARTIST, SIZE, seed=1)


@pytest.fixture(scope="module")
def style_classifier(train_set):
    return _classifier(*_dataset_features(train_set))


def test_artist_names_are_unique_and_filesystem_safe():
    names = artist_names(150)
    assert len(set(names)) == 150
    assert any(not n.isascii() for n in names) and any(" " in n for n in names)
    for name in names:
        assert not set(name) & set('<>:"/\\|?*,'), name
        assert name == name.strip(" .") and name


def test_layout_and_counts(train_set):
    root = train_set["output_dir"]
    assert train_set["artists"] == artist_names(NUM_ARTISTS)
    assert train_set["counts"] == {n: TRAIN_PER_ARTIST for n in train_set["artists"]}
    assert sorted(p.name for p in root.iterdir()) == sorted([*train_set["artists"], MIXED_DIR, MIXED_CSV])
    for name in train_set["artists"]:
        files = sorted((root / name).iterdir())
        assert len(files) == TRAIN_PER_ARTIST
        assert {f.suffix for f in files} == {".jpg", ".png"}
        with Image.open(files[0]) as im:
            assert im.mode == "RGB" and im.size == (SIZE, SIZE)
    mixed_images = sorted(p for p in (root / MIXED_DIR).iterdir() if p.suffix != ".txt")
    assert train_set["num_mixed"] == len(mixed_images) == 40
    # Each blend has a label sidecar that agrees with the CSV (the layout the multi-label CSV tools read).
    rows = dict(read_multilabel_csv(train_set["csv_path"]))
    for image in mixed_images:
        sidecar = read_label_file(image.with_suffix(".txt"))
        assert sidecar == rows[f"{MIXED_DIR}/{image.name}"]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    def snapshot(seed: int, name: str) -> dict[str, bytes]:
        root = tmp_path / name
        generate_artists(root, num_artists=3, images_per_artist=3, size=48, seed=seed, mix=True, num_mixed=4)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, again, other = snapshot(0, "a"), snapshot(0, "b"), snapshot(1, "c")
    assert first == again
    assert first.keys() == other.keys()
    images = [k for k in first if k.endswith((".jpg", ".png"))]
    assert all(first[k] != other[k] for k in images)


def test_parameterised_styles_are_all_distinct():
    params = [{k: v for k, v in vars(make_style(i)).items() if k != "name"} for i in range(120)]
    assert len({repr(p) for p in params}) == 120


def test_mixed_csv_rows_parse_and_sum_to_one(train_set):
    root, artists = train_set["output_dir"], set(train_set["artists"])
    with open(train_set["csv_path"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and list(rows[0]) == ["image_path", "labels"]
    sizes = set()
    for row in rows:
        assert (root / row["image_path"]).is_file()
        labels = list(parse_labels(row["labels"]).items())
        names, weights = [n for n, _ in labels], [w for _, w in labels]
        assert set(names) <= artists and len(set(names)) == len(names)
        assert sum(weights) == pytest.approx(1.0)
        assert set(weights) <= {*MIX_ALPHAS, 1.0} and weights == sorted(weights, reverse=True)
        sizes.add(len(labels))
    assert sizes == {1, 2}  # both blends and pure single-style rows


def test_styles_separate_on_a_held_out_seed(style_classifier, test_set):
    accuracy = style_classifier.score(*_dataset_features(test_set))
    assert accuracy >= 0.9, accuracy  # chance is 1/8


def test_styles_separate_without_colour(train_set, test_set):
    """Greyscale texture and orientation alone identify the artist, so colour jitter cannot erase the style."""
    clf = _classifier(*_dataset_features(train_set, colour=False))
    accuracy = clf.score(*_dataset_features(test_set, colour=False))
    assert accuracy >= 0.8, accuracy


def test_same_content_is_classified_by_style(style_classifier):
    correct = 0
    for k in range(3):
        content = make_content(np.random.default_rng([99, k]), SIZE)
        for a in range(NUM_ARTISTS):
            img = render(content, make_style(a), np.random.default_rng([99, k, a]))
            correct += int(style_classifier.predict([style_statistics(img)])[0] == a)
    assert correct >= 0.9 * 3 * NUM_ARTISTS, correct


def test_mixed_images_follow_their_proportions(train_set, style_classifier):
    """A classifier trained on pure styles ranks the 0.75 artist of a blend above the 0.25 one."""
    root, artists = train_set["output_dir"], train_set["artists"]
    with open(train_set["csv_path"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    pure = pure_ok = uneven = uneven_ok = 0
    for row in rows:
        labels = [(artists.index(n), w) for n, w in parse_labels(row["labels"]).items()]
        proba = style_classifier.predict_proba([style_statistics(_load(root / row["image_path"]))])[0]
        if len(labels) == 1:
            pure, pure_ok = pure + 1, pure_ok + int(proba.argmax() == labels[0][0])
        elif labels[0][1] > labels[1][1]:
            uneven, uneven_ok = uneven + 1, uneven_ok + int(proba[labels[0][0]] > proba[labels[1][0]])
    assert pure and uneven
    assert pure_ok >= 0.9 * pure and uneven_ok >= 0.85 * uneven, (pure_ok, pure, uneven_ok, uneven)


def test_many_parameterised_artists_separate(tmp_path):
    n = 24
    train = generate_artists(tmp_path / "train", num_artists=n, images_per_artist=8, size=48, seed=0)
    test = generate_artists(tmp_path / "test", num_artists=n, images_per_artist=4, size=48, seed=1)
    accuracy = _classifier(*_dataset_features(train)).score(*_dataset_features(test))
    assert accuracy >= 0.85, accuracy


def test_main_writes_dataset(tmp_path, capsys):
    args = get_args_parser().parse_args(["--output-dir", str(tmp_path / "out"), "--num-artists", "2",
                                         "--images-per-artist", "2", "--size", "32", "--mix", "--num-mixed", "3"])
    result = main(args)
    assert result["csv_path"].is_file() and result["num_mixed"] == 3
    assert "wrote 7 images of 2 artists" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--num-artists", "1", "--mix"], "--mix blends two artists"),
    (["--size", "16"], "--size 16 is too small"),
    (["--images-per-artist", "0"], "must be at least 1"),
])
def test_cli_rejects_bad_flags(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "o"), *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr


def test_cli_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path), "--num-artists", "2",
                           "--images-per-artist", "1", "--size", "32"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--overwrite" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
