"""Galleries in Milvus against a real Milvus Lite (embedded, started here in a temporary file): the same answers as a
folder gallery, add/remove/calibrate round trips, copies both ways, the service, and the one-line errors."""

import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from pymilvus import DataType
from test_serve import HTTP, build_test_gallery, get, post, running, upload, write_model_folder

import inference_artist
import serve
from retrieval import milvus_gallery
from retrieval.gallery import Gallery, load_gallery, save_gallery
from retrieval.store import copy_gallery, open_gallery
from retrieval.store import save_gallery as store_gallery
from tools import build_gallery, gallery_copy, search_similar
from utils import UserError

ARTISTS, PER_ARTIST, DIM = 8, 24, 32
RUN = ["--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory) -> str:
    """One Milvus Lite file for the module (each test uses its own collections); its server is closed after."""
    path = str(tmp_path_factory.mktemp("milvus") / "galleries.db")
    yield path
    milvus_gallery.disconnect(path)


def clustered(rng: np.random.Generator, centers: np.ndarray, labels: np.ndarray, spread: float = 0.7) -> np.ndarray:
    vectors = centers[labels] + spread * rng.normal(size=(len(labels), centers.shape[1]))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    """References of ARTISTS clustered artists, held-out vectors of them, and queries of enrolled and other artists."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(ARTISTS + 4, DIM))
    labels = np.repeat(np.arange(ARTISTS), PER_ARTIST)
    held_out = np.repeat(np.arange(ARTISTS), 5)
    unknown = np.repeat(np.arange(ARTISTS, ARTISTS + 4), 4)
    return {"vectors": clustered(rng, centers, labels), "artists": [f"artist \"{i}\" é" for i in labels],
            "paths": [f"/refs/{i}/{n}.png" for n, i in enumerate(labels)],
            "held_out": clustered(rng, centers, held_out), "held_out_artists": [f"artist \"{i}\" é" for i in held_out],
            "queries": np.concatenate([clustered(rng, centers, held_out[::2]), clustered(rng, centers, unknown)]),
            "extra": clustered(rng, centers, np.full(6, ARTISTS + 1))}


def folder_gallery(world, folder: Path) -> Gallery:
    gallery = Gallery(world["vectors"], world["artists"], world["paths"], {"descriptor": "pooled", "feature_dim": DIM})
    gallery.calibrate(world["held_out"], world["held_out_artists"], 0.1)
    gallery.calibration = {"images": len(world["held_out"]), "target_false_unknown": 0.1}
    save_gallery(gallery, folder)
    return load_gallery(folder)


def assert_same_answers(folder, milvus, queries: np.ndarray) -> None:
    """Same identifications and unknown decisions, same nearest works (exact search on both)."""
    ours, theirs = folder.match(queries, 3), milvus.match(queries, 3)
    assert [[a["artist"] for a in m["artists"]] for m in ours] == [[a["artist"] for a in m["artists"]] for m in theirs]
    assert [m["unknown"] for m in ours] == [m["unknown"] for m in theirs]
    np.testing.assert_allclose([[a["score"] for a in m["artists"]] for m in ours],
                               [[a["score"] for a in m["artists"]] for m in theirs], atol=1e-6)
    near, far = folder.nearest(queries, 5), milvus.nearest(queries, 5)
    assert [[(w["artist"], w["path"]) for w in row] for row in near] == \
        [[(w["artist"], w["path"]) for w in row] for row in far]
    np.testing.assert_allclose([[w["score"] for w in row] for row in near],
                               [[w["score"] for w in row] for row in far], atol=1e-5)


def test_a_milvus_gallery_answers_as_its_folder_gallery(world, milvus_db, tmp_path):
    folder = folder_gallery(world, tmp_path / "gallery")
    location = f"{milvus_db}#same"
    milvus = copy_gallery(tmp_path / "gallery", location)
    assert type(milvus).__name__ == "MilvusGallery" and milvus.index_parameters()["type"] == "FLAT"
    assert milvus.model == folder.model and milvus.artist_thresholds == folder.artist_thresholds
    unknown = folder.match(world["queries"], 1)
    assert 0 < sum(m["unknown"] for m in unknown) < len(unknown)  # both decisions are exercised
    assert_same_answers(folder, milvus, world["queries"])
    np.save(tmp_path / "q.npy", world["queries"][:3])
    (tmp_path / "q.txt").write_text("a\nb\nc\n")
    records = [search_similar.main(search_similar.get_args_parser().parse_args(
        ["--gallery", str(where), "--query", str(tmp_path / "q.npy"), "--names", str(tmp_path / "q.txt"),
         "--top-k", "4"])) for where in (tmp_path / "gallery", location)]
    assert [(r["query"], r["rank"], r["path"]) for r in records[0]] == [(r["query"], r["rank"], r["path"])
                                                                        for r in records[1]]
    with pytest.raises(UserError, match="built with another model"):
        milvus.check_identity({"descriptor": "pooled", "feature_dim": DIM + 1}, location)


def test_add_remove_and_calibrate_round_trip(world, milvus_db, tmp_path):
    folder = folder_gallery(world, tmp_path / "gallery")
    location = f"{milvus_db}#changes"
    copy_gallery(tmp_path / "gallery", location)
    removed, added = world["artists"][0], "newcomer"
    paths = [f"/new/{i}.png" for i in range(len(world["extra"]))]
    for where, gallery in ((tmp_path / "gallery", folder), (location, open_gallery(location))):
        changed = gallery.removed(removed).extended(world["extra"], [added] * 6, paths)
        changed = changed.extended(world["held_out"][-2:], [world["artists"][-1]] * 2, ["/more/0.png", "/more/1.png"])
        keep = [i for i, a in enumerate(world["held_out_artists"]) if a != removed]
        changed.calibrate(world["held_out"][keep], [world["held_out_artists"][i] for i in keep], 0.2)
        store_gallery(changed, where)
    folder, milvus = load_gallery(tmp_path / "gallery"), open_gallery(location)
    assert milvus.meta["revision"] == 2 and milvus.size == folder.size == len(world["artists"]) - PER_ARTIST + 8
    assert milvus.artist_names == folder.artist_names and removed not in milvus.artist_names
    assert milvus.image_counts() == folder.image_counts() and milvus.image_counts()[added] == 6
    np.testing.assert_allclose(milvus.prototypes, folder.prototypes, atol=1e-6)
    assert milvus.artist_thresholds == pytest.approx(folder.artist_thresholds)
    assert milvus.unknown_threshold == pytest.approx(folder.unknown_threshold)
    assert milvus.known_paths(["/more/1.png", "/nope.png", world["paths"][-1]]) == {"/more/1.png", world["paths"][-1]}
    assert_same_answers(folder, milvus, world["queries"])
    build_gallery.main(build_gallery.get_args_parser().parse_args(["--output-dir", location, "--remove", added]))
    assert added not in open_gallery(location).artist_names
    with pytest.raises(UserError, match="not in the gallery; did you mean 'artist"):
        open_gallery(location).removed("artist \"1\"")


def test_disconnect_writes_a_milvus_lite_file_so_that_removing_it_is_final(world, tmp_path):
    """Disconnecting stops the file's embedded server: reopening reads what was written, and a file removed after
    disconnecting is not written again when the process stops its servers at exit (as the benchmark's was)."""
    from milvus_lite.server_manager import server_manager_instance

    folder_gallery(world, tmp_path / "gallery")
    lite = tmp_path / "own" / "file.db"
    copy_gallery(tmp_path / "gallery", f"{lite}#refs")
    milvus_gallery.disconnect(f"{lite}#refs")
    assert open_gallery(f"{lite}#refs").size == len(world["vectors"])  # a new server reads the flushed file
    milvus_gallery.disconnect(str(lite))
    shutil.rmtree(lite.parent)
    server_manager_instance.release_server(str(lite))  # what the process does at exit
    assert not lite.parent.exists()


def test_copies_folder_to_milvus_and_back_are_equal(world, milvus_db, tmp_path, capsys):
    folder = folder_gallery(world, tmp_path / "gallery")
    location = f"{milvus_db}#copy"
    for source, target in ((tmp_path / "gallery", location), (location, tmp_path / "back")):
        gallery_copy.main(gallery_copy.get_args_parser().parse_args([str(source), str(target)]))
    assert f"copied {len(world['artists'])} vectors of {ARTISTS} artists" in capsys.readouterr().out
    back = load_gallery(tmp_path / "back")
    np.testing.assert_allclose(back.vectors, folder.vectors, atol=1e-6)
    assert (back.artists, back.paths, back.model, back.calibration) == (folder.artists, folder.paths, folder.model,
                                                                        folder.calibration)
    assert (back.unknown_threshold, back.artist_thresholds) == (folder.unknown_threshold, folder.artist_thresholds)
    with pytest.raises(UserError, match=r"holds a collection 'copy' already; .*--replace"):
        copy_gallery(tmp_path / "back", location)
    assert copy_gallery(tmp_path / "back", location, replace=True).meta["revision"] == 1


def test_the_service_and_inference_use_a_milvus_gallery_built_by_build_gallery(milvus_db, tmp_path, capsys):
    model_dir = write_model_folder(tmp_path / "model", ["a", "b", "c"])
    folder_dir = build_test_gallery(tmp_path, model_dir)
    location = f"{milvus_db}#served"
    build_gallery.main(build_gallery.get_args_parser().parse_args(
        ["--checkpoint", str(model_dir), "--images", str(tmp_path / "refs"), "--output-dir", location,
         "--calibrate", str(tmp_path / "calib"), *RUN]))
    folder, milvus = load_gallery(folder_dir), open_gallery(location)
    assert milvus.model == folder.model and milvus.artist_thresholds == pytest.approx(folder.artist_thresholds)
    single = tmp_path / "calib" / "ben" / "0.png"
    results = [inference_artist.main(inference_artist.get_args_parser().parse_args(
        ["--checkpoint", str(model_dir), "--gallery", where, "--input", str(single), "--output",
         str(tmp_path / f"out{n}"), *RUN]))["gallery"] for n, where in enumerate((str(folder_dir), location))]
    assert [a["artist"] for a in results[0]["artists"]] == [a["artist"] for a in results[1]["artists"]]
    assert results[0]["unknown"] == results[1]["unknown"]
    args = serve.get_args_parser().parse_args(["--checkpoint", str(model_dir), "--gallery", location, "--port", "0",
                                               "--log-level", "warning", *RUN[:2]])
    with running(*serve.prepare(args)) as url:
        assert get(f"{url}/v1/model").json()["gallery"]["index"] == "FLAT"
        response = post(f"{url}/v1/similar?top_k=3", [upload(Path(folder.paths[4]))])
        assert response.status == 200, response.data
        works = response.json()["results"][0]["works"]
        assert works[0]["id"] == 4 and works[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert works[0]["name"] == Path(folder.paths[4]).name
        assert get(f"{url}/{works[0]['thumbnail']}").headers["content-type"] == "image/jpeg"
        assert get(f"{url}/v1/gallery/images/99").status == 404
        response = HTTP.request("DELETE", f"{url}/v1/gallery/artists/cleo")
        assert response.status == 200 and response.json()["removed"] == 2, response.data
        assert get(f"{url}/v1/gallery/artists").json()["total"] == 2
    assert open_gallery(location).artist_names == ["anna", "ben"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_milvus_problems_are_one_line_errors(milvus_db, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(UserError, match=f"cannot reach Milvus at {uri}.*start the Milvus server"):
        open_gallery(uri)
    with pytest.raises(UserError, match=r"holds no gallery 'missing'; build one with tools/build_gallery.py"):
        open_gallery(f"{milvus_db}#missing")
    client, _ = milvus_gallery.connect(milvus_db)
    schema = client.create_schema(auto_id=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=4)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="L2")
    client.create_collection("movies", schema=schema, index_params=index)
    with pytest.raises(UserError, match=r"collection 'movies' at .* is not an artist gallery \(fields pk, embedding"):
        open_gallery(f"{milvus_db}#movies")
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    monkeypatch.delitem(sys.modules, "retrieval.milvus_gallery")
    with pytest.raises(UserError, match="needs the package 'pymilvus'.*requirements-milvus.txt"):
        open_gallery(f"{milvus_db}#movies")
