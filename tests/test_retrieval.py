"""Retrieval building blocks without a model: metrics on hand-made vectors, gallery files, Faiss indexes."""

import json

import numpy as np
import pytest

from retrieval.gallery import (
    GALLERY_FILE,
    VECTORS_FILE,
    Gallery,
    calibrate_threshold,
    load_gallery,
    save_gallery,
)
from retrieval.index import build_index, l2_normalize, search
from retrieval.metrics import identification_metrics, retrieval_metrics
from utils import UserError

MODEL = {"architecture": "lsnet_t_artist", "checkpoint_sha256": "ab" * 32, "feature_dim": 4}


def unit(*rows):
    return l2_normalize(np.array(rows, np.float32))


def test_retrieval_metrics_match_hand_computed_values():
    # a0 and a1 are near each other, b0 lies between the a's and b1; c0 has no partner (unanswerable).
    features = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.7, 0.7, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    labels = ["a", "a", "b", "b", "c"]
    m = retrieval_metrics(features, labels, ks=(1, 2))
    assert m["num_queries"] == 4 and m["num_unanswerable"] == 1 and m["normalized"]
    # rankings: a0 -> a1 b0 ...; a1 -> a0 b0 ...; b0 -> a1 a0 b1; b1 -> b0 a1 a0
    assert m["recall@1"] == pytest.approx(3 / 4)
    assert m["recall@2"] == pytest.approx(3 / 4)
    assert m["mrr"] == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)
    assert m["map@r"] == pytest.approx((1 + 1 + 0 + 1) / 4)


def test_identification_and_open_set_rates():
    predicted = [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    scores = np.array([[0.9, 0.1], [0.4, 0.3], [0.8, 0.2], [0.3, 0.1]])
    m = identification_metrics(predicted, ["a", "a", "x", "y"], {"a", "b"}, scores[:, 0] < 0.5)
    assert (m["top1"], m["top5"]) == (0.5, 1.0)
    assert m["false_unknown_rate"] == 0.5 and m["unknown_detection_rate"] == 0.5 and m["open_set_top1"] == 0.5


def test_calibrated_threshold_keeps_the_target_rate():
    scores = np.linspace(0.0, 1.0, 101)
    threshold = calibrate_threshold(scores, 0.05)
    assert (scores < threshold).mean() <= 0.05 < (scores <= threshold).mean() + 0.01
    with pytest.raises(UserError, match="rate"):
        calibrate_threshold(scores, 1.5)


def test_per_artist_thresholds_reject_an_impostor_a_global_threshold_admits(tmp_path):
    """A tight artist (works nearly alike) and a loose one: one global threshold must sit below the loose artist's
    least typical works, so it admits an impostor close to the tight artist; per-artist thresholds do not."""
    rng = np.random.default_rng(0)

    def works(axis: int, spread: float, count: int) -> np.ndarray:
        return l2_normalize(np.eye(8)[axis] + spread * rng.normal(size=(count, 8)))

    gallery = Gallery(np.concatenate([works(0, 0.05, 4), works(1, 0.5, 4)]), ["tight"] * 4 + ["loose"] * 4,
                      [f"/r/{i}.png" for i in range(8)], MODEL)
    held_out = np.concatenate([works(0, 0.05, 20), works(1, 0.5, 20)])
    rate = gallery.calibrate(held_out, ["tight"] * 20 + ["loose"] * 20, 0.05)
    assert rate <= 0.05 and set(gallery.artist_thresholds) == {"tight", "loose"}
    assert gallery.artist_thresholds["tight"] > gallery.artist_thresholds["loose"] + 0.1
    impostor = l2_normalize((np.eye(8)[0] + 1.5 * np.eye(8)[2])[None])  # cosine 0.55 to the tight artist
    assert gallery.match(impostor, 1)[0]["unknown"]
    assert not gallery.match(impostor, 1, threshold=gallery.artist_thresholds["loose"])[0]["unknown"]
    assert not gallery.match(held_out[:1], 1)[0]["unknown"]

    loaded = load_gallery(save_gallery(gallery, tmp_path / "g"))
    assert loaded.artist_thresholds == pytest.approx(gallery.artist_thresholds)
    assert loaded.unknown_threshold == pytest.approx(gallery.unknown_threshold)
    assert loaded.removed("loose").artist_thresholds == {"tight": pytest.approx(gallery.artist_thresholds["tight"])}
    # An artist enrolled after calibration is judged by the threshold for artists without their own.
    newcomer = loaded.extended(works(3, 0.05, 2), ["new", "new"], ["/r/n0.png", "/r/n1.png"])
    scores, ids = newcomer.identify(l2_normalize((np.eye(8)[3] + 0.9 * np.eye(8)[4])[None]), 1)
    assert newcomer.artist_names[ids[0, 0]] == "new"
    assert newcomer.unknown(scores, ids)[0] == (scores[0, 0] < newcomer.unknown_threshold)


def test_gallery_calibrated_before_per_artist_thresholds_still_loads(tmp_path):
    gallery = make_gallery()
    folder = save_gallery(gallery, tmp_path / "g")
    meta = json.loads((folder / GALLERY_FILE).read_text())
    del meta["artist_thresholds"]
    meta["model"].pop("descriptor", None)
    (folder / GALLERY_FILE).write_text(json.dumps(meta))
    loaded = load_gallery(folder)
    assert loaded.artist_thresholds is None and loaded.descriptor == "pooled"
    scores = np.array([[0.2], [0.3]])
    assert loaded.unknown(scores, np.zeros((2, 1), int)).tolist() == [True, False]  # the one threshold, 0.25


def make_gallery(count=6):
    rng = np.random.default_rng(0)
    vectors = l2_normalize(rng.normal(size=(count, 4)))
    artists = [f"artist {i % 3}" for i in range(count)]
    return Gallery(vectors, artists, [f"/refs/{a}/{i}.png" for i, a in enumerate(artists)], MODEL, 0.25)


def test_gallery_round_trip_prototypes_and_identify(tmp_path):
    gallery = make_gallery()
    save_gallery(gallery, tmp_path / "g")
    loaded = load_gallery(tmp_path / "g")
    assert loaded.artists == gallery.artists and loaded.paths == gallery.paths and loaded.unknown_threshold == 0.25
    np.testing.assert_allclose(loaded.vectors, gallery.vectors)
    meta = json.loads((tmp_path / "g" / GALLERY_FILE).read_text())
    assert meta["normalized"] and meta["model"] == MODEL and meta["index"]["type"] == "flat_ip"
    mean = gallery.vectors[[0, 3]].mean(0)
    np.testing.assert_allclose(loaded.prototypes[0], mean / np.linalg.norm(mean), atol=1e-6)
    scores, ids = loaded.identify(unit(mean), 2)
    assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    smaller = loaded.removed("artist 1")
    assert "artist 1" not in smaller.artist_names and len(smaller.paths) == 4
    with pytest.raises(UserError, match="not in the gallery"):
        loaded.removed("nobody")


def test_another_model_is_refused_in_one_line():
    with pytest.raises(UserError, match="another model") as err:
        make_gallery().check_identity({**MODEL, "checkpoint_sha256": "cd" * 32}, "g")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated vectors", "bad json", "not unit"])
def test_damaged_gallery_is_a_one_line_error(tmp_path, damage):
    save_gallery(make_gallery(), tmp_path / "g")
    if damage == "truncated vectors":
        data = (tmp_path / "g" / VECTORS_FILE).read_bytes()
        (tmp_path / "g" / VECTORS_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "bad json":
        (tmp_path / "g" / GALLERY_FILE).write_text("{not json")
    else:
        np.save(tmp_path / "g" / VECTORS_FILE, np.full((6, 4), 3.0, np.float32))
    with pytest.raises(UserError, match="damaged") as err:
        load_gallery(tmp_path / "g")
    assert "\n" not in str(err.value)


def test_failed_save_leaves_the_old_gallery_and_no_temporary_folder(tmp_path, monkeypatch):
    save_gallery(make_gallery(), tmp_path / "g")
    before = (tmp_path / "g" / VECTORS_FILE).read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("retrieval.gallery.os.replace", fail)
    with pytest.raises(OSError):
        save_gallery(make_gallery(9), tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    assert (tmp_path / "g" / VECTORS_FILE).read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    monkeypatch.undo()
    with pytest.raises(UserError, match="not a gallery folder"):
        save_gallery(make_gallery(), tmp_path / "other")


def test_ivf_index_above_the_limit_finds_most_exact_neighbours():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 32))
    vectors = l2_normalize(centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32)))
    queries = vectors[:100] + 0.05 * rng.normal(size=(100, 32)).astype(np.float32)
    exact, exact_params = build_index(vectors)
    approx, params = build_index(vectors, exact_limit=1000)
    assert exact_params["type"] == "flat_ip" and params["type"] == "ivf_flat_ip"
    assert params["nlist"] == 63 and params["nprobe"] == 16
    truth = search(exact, queries, 10)[1]
    found = search(approx, queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert recall > 0.9


def test_ivf_gallery_saves_and_reloads_its_index(tmp_path):
    rng = np.random.default_rng(2)
    vectors = l2_normalize(rng.normal(size=(300, 4)))
    gallery = Gallery(vectors, [f"a{i % 5}" for i in range(300)], [str(i) for i in range(300)], MODEL,
                      exact_limit=100)
    save_gallery(gallery, tmp_path / "g")
    loaded = load_gallery(tmp_path / "g")
    index, params = loaded.index()
    assert params["type"] == "ivf_flat_ip" and index.ntotal == 300 and index.nprobe == params["nprobe"]
    (tmp_path / "g" / "index.faiss").write_bytes(b"junk")
    with pytest.raises(UserError, match="damaged"):
        load_gallery(tmp_path / "g")
