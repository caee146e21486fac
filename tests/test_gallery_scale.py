"""Galleries and search at community scale, pinned on small data: blocked calibration, the cached prototype scores,
the sharded folder (add / remove without rewriting every vector, version-1 folders, crash safety), name hints, the
compressed index chosen from a memory budget, and building from a features file."""

import json

import numpy as np
import pytest

import retrieval.gallery as galleries
from retrieval.gallery import GALLERY_FILE, VECTORS_FILE, Gallery, calibrate_threshold, load_gallery, save_gallery
from retrieval.index import RerankedIndex, index_parameters, l2_normalize, search
from utils import UserError

MODEL = {"architecture": "lsnet_t_artist", "checkpoint_sha256": "ab" * 32, "feature_dim": 16}


def clustered(artists: int, per_artist: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Unit vectors around one random centre per artist, artist by artist."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(artists, dim))
    labels = np.repeat(np.arange(artists), per_artist)
    vectors = l2_normalize(centres[labels] + 0.6 * rng.normal(size=(len(labels), dim)))
    return vectors, [f"artist {i:02d}" for i in labels]


def make(artists: int = 12, per_artist: int = 5, seed: int = 0, **kwargs) -> Gallery:
    vectors, names = clustered(artists, per_artist, seed=seed)
    return Gallery(vectors, names, [f"/refs/{seed}/{i}.png" for i in range(len(names))], MODEL, **kwargs)


def same(a: Gallery, b: Gallery) -> None:
    assert a.artists == b.artists and a.paths == b.paths and a.artist_names == b.artist_names
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    np.testing.assert_allclose(a.prototypes, b.prototypes, atol=1e-5)


def test_blocked_calibration_equals_the_dense_result():
    gallery = make()
    held_out, truth = clustered(12, 3, seed=0)
    truth = truth[:33]  # the last artist has no held-out images
    held_out = held_out[:33]
    # the dense computation of the version before blocks: a held-out x artists matrix and a loop over artists
    similarity = held_out @ gallery.prototypes.T
    own = np.array([gallery.artist_names.index(a) for a in truth])
    genuine = similarity[np.arange(len(own)), own]
    typical = {n: float(genuine[own == i].mean()) for i, n in enumerate(gallery.artist_names) if (own == i).any()}
    overall = float(np.mean(list(typical.values())))
    offsets = similarity.max(1) - np.array([typical.get(gallery.artist_names[i], overall)
                                            for i in similarity.argmax(1)])
    offset = calibrate_threshold(offsets, 0.1)
    results = []
    for block in (None, 1, 4):  # the default block holds every image; one and four images at a time
        rate = gallery.calibrate(held_out, truth, 0.1, block_rows=block)
        results.append((rate, gallery.unknown_threshold, gallery.artist_thresholds))
        assert gallery.unknown_threshold == pytest.approx(overall + offset, abs=1e-6)
        assert gallery.artist_thresholds == pytest.approx({n: t + offset for n, t in typical.items()}, abs=1e-6)
        assert rate == pytest.approx(np.mean(offsets < offset), abs=1 / len(truth)) and rate <= 0.1
    assert results[0][0] == results[1][0] == results[2][0]  # the same images marked unknown at every block size


def test_cached_scores_and_index_equal_fresh_ones_after_add_and_remove():
    gallery = make(exact_limit=20)  # 60 vectors: an IVF index, moved along (not rebuilt) by add and remove
    gallery.calibrate(*clustered(12, 2, seed=0), 0.05)
    index = gallery.index()[0]
    queries = clustered(12, 2, seed=5)[0]

    def check(derived: Gallery) -> None:
        fresh = Gallery(derived.vectors.copy(), derived.artists, derived.paths, MODEL)
        for got, want in zip(derived.identify(queries, 3), fresh.identify(queries, 3), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)
        assert derived.index()[0] is index
        index.nprobe = index.nlist  # every cell visited: the IVF index must give the exact answers
        exact_scores, exact_ids = _exact(derived.vectors, queries)
        scores, ids = search(index, queries, 5)
        np.testing.assert_array_equal(ids, exact_ids)
        np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
        assert derived.unknown(*derived.identify(queries, 1)) is not None

    extra, extra_names = clustered(3, 4, seed=9)
    grown = gallery.extended(extra, [f"new {n}" for n in extra_names], [f"/new/{i}" for i in range(12)])
    check(grown)
    check(grown.removed("artist 03"))


def _exact(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    return np.take_along_axis(scores, ids, 1), ids


def shard_files(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name.startswith("vectors")}


@pytest.mark.parametrize("exact_limit", [1000, 30])
def test_add_and_remove_write_only_new_shards_and_equal_a_gallery_built_from_scratch(tmp_path, monkeypatch,
                                                                                    exact_limit):
    monkeypatch.setattr(galleries, "SHARD_ROWS", 16)
    base = make(exact_limit=exact_limit)
    save_gallery(base, tmp_path / "g")
    before = shard_files(tmp_path / "g")
    assert len(before) == 4 and VECTORS_FILE in before  # 60 rows in shards of 16; the first has the old name
    extra, names = clustered(2, 18, seed=3)
    names, paths = [f"new {n}" for n in names], [f"/new/{i}" for i in range(36)]
    loaded = load_gallery(tmp_path / "g")
    save_gallery(loaded.extended(extra, names, paths), tmp_path / "g")
    after_add = shard_files(tmp_path / "g")
    assert {n: t for n, t in after_add.items() if n in before} == before and len(after_add) == 4 + 3
    scratch = Gallery(np.concatenate([base.vectors, extra]), base.artists + names, base.paths + paths, MODEL)
    same(load_gallery(tmp_path / "g"), scratch)

    save_gallery(load_gallery(tmp_path / "g").removed("artist 01"), tmp_path / "g")  # rows 5-9: the first shard
    after_remove = shard_files(tmp_path / "g")
    assert VECTORS_FILE not in after_remove and len(set(after_remove) - set(after_add)) == 1
    keep = [i for i, a in enumerate(scratch.artists) if a != "artist 01"]
    reloaded = load_gallery(tmp_path / "g")
    same(reloaded, Gallery(scratch.vectors[keep], [scratch.artists[i] for i in keep],
                           [scratch.paths[i] for i in keep], MODEL))
    assert reloaded.index()[0].ntotal == len(keep)
    late = clustered(1, 3, seed=4)[0]
    save_gallery(reloaded.extended(late, ["late"] * 3, ["/l/0", "/l/1", "/l/2"]), tmp_path / "g")
    after_late = shard_files(tmp_path / "g")  # the 4-row last shard is rewritten with the 3 new rows
    assert len(after_late) == len(after_remove) and len(set(after_late) - set(after_remove)) == 1
    reloaded = load_gallery(tmp_path / "g")
    assert [s["rows"] for s in json.loads((tmp_path / "g" / GALLERY_FILE).read_text())["shards"]][-1] == 7
    np.testing.assert_allclose(reloaded.vectors[-3:], late, atol=1e-6)
    assert reloaded.artists[-3:] == ["late"] * 3 and reloaded.index()[0].ntotal == len(keep) + 3
    names_on_disk = {p.name for p in (tmp_path / "g").iterdir()}
    manifest = json.loads((tmp_path / "g" / GALLERY_FILE).read_text())
    named = {manifest["prototypes_file"], manifest["index_file"], GALLERY_FILE}
    named |= {n for s in manifest["shards"] for n in (s["vectors"], s["references"])}
    assert names_on_disk == named - {None} and manifest["version"] == 2


def test_version_1_gallery_loads_and_is_converted_on_the_first_write(tmp_path):
    gallery = make()
    folder = save_gallery(gallery, tmp_path / "g")
    meta = json.loads((folder / GALLERY_FILE).read_text())
    for key in ("shards", "prototypes_file", "index_file", "next_file"):
        del meta[key]
    meta["version"] = 1  # the folder is now exactly what version 1 wrote
    (folder / GALLERY_FILE).write_text(json.dumps(meta))
    old_vectors = (folder / VECTORS_FILE).read_bytes()
    loaded = load_gallery(folder)
    same(loaded, gallery)
    save_gallery(loaded.extended(*clustered(1, 3, seed=4)[:1], ["late"] * 3, ["/l/0", "/l/1", "/l/2"]), folder)
    meta = json.loads((folder / GALLERY_FILE).read_text())
    assert meta["version"] == 2 and meta["shards"][0]["vectors"] == VECTORS_FILE
    assert (folder / VECTORS_FILE).read_bytes() == old_vectors
    assert load_gallery(folder).artist_names[-1] == "late"


def test_failed_add_leaves_the_old_gallery_loading_and_no_new_files(tmp_path, monkeypatch):
    save_gallery(make(), tmp_path / "g")
    files = sorted(p.name for p in (tmp_path / "g").iterdir())
    loaded = load_gallery(tmp_path / "g")
    grown = loaded.extended(*clustered(1, 3, seed=4)[:1], ["late"] * 3, ["/l/0", "/l/1", "/l/2"])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("retrieval.gallery.os.replace", fail)
    with pytest.raises(OSError):
        save_gallery(grown, tmp_path / "g")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == files
    same(load_gallery(tmp_path / "g"), make())


def test_damaged_prototypes_are_a_one_line_error(tmp_path):
    folder = save_gallery(make(), tmp_path / "g")
    prototypes = np.load(folder / "prototypes.npy")
    np.save(folder / "prototypes.npy", prototypes[::-1].copy())
    with pytest.raises(UserError, match="damaged.*prototypes do not match") as err:
        load_gallery(folder)
    assert "\n" not in str(err.value)


def test_unknown_artist_name_suggests_close_names_not_all():
    vectors, _ = clustered(1, 400)
    names = [f"artist {i:03d}" for i in range(398)] + ["Katsushika Hokusai", "Utagawa Hiroshige"]
    gallery = Gallery(vectors, names, [f"/r/{i}" for i in range(400)], MODEL)
    with pytest.raises(UserError, match="did you mean 'Katsushika Hokusai'") as err:
        gallery.removed("Katsushika Hokusia")
    assert len(str(err.value)) < 200 and "\n" not in str(err.value) and "artist 0" not in str(err.value)
    with pytest.raises(UserError, match="none of the 400 enrolled artists is close"):
        gallery.removed("Zzyzx")


def test_index_choice_from_count_and_budget_and_its_recorded_parameters(tmp_path):
    assert index_parameters(50_000, 448)["type"] == "flat_ip"
    assert index_parameters(2_000_000, 448)["type"] == "ivf_flat_ip"  # 3.3 GiB of vectors fit the 4 GiB default
    pq = index_parameters(5_000_000, 448)
    assert pq["type"] == "ivf_pq_ip" and pq["pq_m"] == 56 and pq["memory_gib"] == 4.0
    assert 5_000_000 * (pq["pq_m"] + 8) < 4 * 2**30
    vectors, names = clustered(40, 50, seed=6)  # 2000 x 16: 125 KiB of vectors, over a 0.0001 GiB budget
    gallery = Gallery(vectors, names, [str(i) for i in range(2000)], MODEL, exact_limit=100, index_memory_gib=1e-4)
    save_gallery(gallery, tmp_path / "g")
    params = json.loads((tmp_path / "g" / GALLERY_FILE).read_text())["index"]
    assert params["type"] == "ivf_pq_ip" and params["pq_m"] == 2 and params["memory_gib"] == 1e-4
    assert params["shortlist"] >= 10 and params["nlist"] == 45
    index, _ = load_gallery(tmp_path / "g").index()
    assert isinstance(index, RerankedIndex) and index.index.nprobe == params["nprobe"]
    queries = clustered(40, 2, seed=7)[0]
    scores, ids = search(index, queries, 10)
    exact_scores, exact_ids = _exact(vectors, queries)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids[:, :5], exact_ids, strict=True)])
    assert recall >= 0.9
    np.testing.assert_allclose(scores[:, 0], np.einsum("qd,qd->q", queries, vectors[ids[:, 0]]), atol=1e-5)


def test_memory_precheck_names_the_size_the_need_and_the_option():
    with pytest.raises(UserError) as err:
        index_parameters(10**9, 448, memory_gib=4)
    message = str(err.value)
    assert "1000000000 vectors needs 8.4 GiB" in message and "--index-memory-gib" in message and "\n" not in message


def test_gallery_from_a_features_file_equals_one_built_in_memory(tmp_path):
    from tools import build_gallery

    raw, names = clustered(6, 7, seed=8)
    raw = raw * np.linspace(0.5, 3, len(raw), dtype=np.float32)[:, None]  # not unit: normalised on the way
    np.save(tmp_path / "features.npy", raw)
    image_names = [f"{n}/work {i}.png" for i, n in enumerate(names)]
    (tmp_path / "image_names.txt").write_text("\n".join(image_names) + "\n", encoding="utf-8")
    args = build_gallery.get_args_parser().parse_args(
        ["--features", str(tmp_path / "features.npy"), "--names", str(tmp_path / "image_names.txt"),
         "--output-dir", str(tmp_path / "g")])
    build_gallery.main(args)
    loaded = load_gallery(tmp_path / "g")
    same(loaded, Gallery(l2_normalize(raw), names, image_names, MODEL))
    assert loaded.model == {"feature_dim": 16, "descriptor": "pooled"}
