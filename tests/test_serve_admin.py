"""Changing what serve.py serves while it runs, on a real uvicorn: enrolling, extending and removing gallery artists
(stored as build_gallery.py would store them), reloads (HTTP and SIGHUP) under load, write protection, /metrics."""

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_serve import (
    CLASSES,
    HTTP,
    LIMITS,
    bad_uploads,
    build_test_gallery,
    get,
    post,
    serving,
    upload,
    write_model_folder,
)

import serve
from predictor import load_model_bundle
from retrieval.gallery import load_gallery
from service import Settings, Source, create_app
from tools import build_gallery


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A model folder and a calibrated gallery of it (3 artists x 2 works), never changed: tests change copies."""
    root = tmp_path_factory.mktemp("admin")
    model_dir = write_model_folder(root / "model", CLASSES)
    return model_dir, build_test_gallery(root, model_dir)


@pytest.fixture(scope="module")
def base_model(base):
    """The base model, loaded once for the apps of this module (a reload loads its own)."""
    return load_model_bundle(base[0], device="cpu")


@pytest.fixture(scope="module")
def dora(tmp_path_factory) -> list[Path]:
    """Works of a new artist: smooth gradients (the gallery's artists are noise), slightly varied."""
    folder = tmp_path_factory.mktemp("dora")
    y, x = np.mgrid[0:64, 0:72]
    paths = []
    for i in range(4):
        rgb = np.stack([x * 3 + 8 * i, y * 3, (x + y) * 2], -1).astype(np.float64)
        noisy = rgb + np.random.default_rng(i).normal(0, 3, rgb.shape)
        paths.append(folder / f"dora {i}.png")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def served(base, base_model, tmp_path):
    """A function starting serve.py's app on a copy of the base gallery (reloadable, gallery writable) with more
    settings; its context yields URL, gallery folder and app."""

    @contextmanager
    def start(name: str = "gallery", **settings) -> Iterator[tuple[str, Path, object]]:
        copy = shutil.copytree(base[1], tmp_path / name)
        source = Source(str(base[0]), str(copy), device="cpu")
        app = create_app(base_model, Settings(**{**LIMITS, **settings}), load_gallery(copy), source)
        with serving(app) as url:
            yield url, copy, app

    return start


def enroll(url: str, artist: str, paths: list[Path], headers: dict[str, str] | None = None):
    fields = [("artist", artist)] + [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return HTTP.request("POST", f"{url}/v1/gallery/artists", fields=fields, headers=headers)


def artists(url: str) -> dict[str, dict]:
    return {e["artist"]: e for e in get(f"{url}/v1/gallery/artists").json()["artists"]}


def top_artist(url: str, image: Path) -> str:
    response = post(f"{url}/v1/similar?top_artists=1", [upload(image)])
    assert response.status == 200, response.data
    return response.json()["results"][0]["artists"][0]["artist"]


def test_enroll_identify_extend_and_remove_an_artist_through_the_api(served, base, dora, tmp_path):
    with served() as (url, gallery_dir, _):
        before = load_gallery(gallery_dir)
        listed = artists(url)
        assert sorted(listed) == ["anna", "ben", "cleo"] and all(e["references"] == 2 for e in listed.values())
        assert all(e["calibrated"] and e["threshold"] == before.artist_thresholds[a] for a, e in listed.items())

        response = enroll(url, "Dora Maar", dora[:2])
        assert response.status == 201, response.data
        assert response.json() == {"artist": "Dora Maar", "references": 2, "added": 2, "calibrated": False,
                                   "threshold": before.unknown_threshold,
                                   "gallery": {"artists": 4, "works": 8, "unknown_threshold": before.unknown_threshold,
                                               "index": "flat_ip"}}
        assert top_artist(url, dora[2]) == "Dora Maar"  # a work it was not enrolled with, on the next request

        # The stored gallery is the one build_gallery.py --add makes from the same reference files.
        refs = Path(f"{gallery_dir}.references")
        assert sorted(p.name for p in (refs / "Dora Maar").iterdir()) == ["dora 0.png", "dora 1.png"]
        expected = shutil.copytree(base[1], tmp_path / "cli")
        build_gallery.main(build_gallery.get_args_parser().parse_args(
            ["--checkpoint", str(base[0]), "--images", str(refs), "--output-dir", str(expected), "--add",
             "--device", "cpu", "--num-workers", "0"]))
        stored, built = load_gallery(gallery_dir), load_gallery(expected)
        assert stored.artists == built.artists and stored.paths == built.paths
        np.testing.assert_allclose(stored.vectors, built.vectors, atol=1e-5)
        assert stored.artist_thresholds == built.artist_thresholds

        added = HTTP.request("POST", f"{url}/v1/gallery/artists/Dora%20Maar/references",
                             fields=[("files", ("dora 0.png", dora[3].read_bytes(), "image/png"))])
        assert added.status == 200 and added.json()["references"] == 3 and added.json()["added"] == 1
        assert (refs / "Dora Maar" / "dora 0-1.png").read_bytes() == dora[3].read_bytes()  # never overwritten

        removed = HTTP.request("DELETE", f"{url}/v1/gallery/artists/Dora%20Maar")
        assert removed.status == 200 and removed.json()["removed"] == 3
        assert sorted(artists(url)) == ["anna", "ben", "cleo"] and top_artist(url, dora[2]) != "Dora Maar"
        assert load_gallery(gallery_dir).artist_names == ["anna", "ben", "cleo"]
        assert not (refs / "Dora Maar").exists()


def test_refused_and_failed_writes_change_nothing_and_concurrent_ones_are_serialized(served, base, dora, tmp_path):
    with served() as (url, gallery_dir, _):
        stored = (gallery_dir / "gallery.json").read_bytes()
        refs = Path(f"{gallery_dir}.references")
        shutil.copy(dora[0], tmp_path / "img0.png")
        for case, (files, status, _, _) in bad_uploads(tmp_path, tmp_path).items():
            classified = post(f"{url}/v1/classify", files)
            fields = [("artist", "eve")] + [("files", (n, d, "application/octet-stream")) for n, d in files]
            enrolled = HTTP.request("POST", f"{url}/v1/gallery/artists", fields=fields)
            assert enrolled.status == classified.status == status, case
            assert enrolled.json() == classified.json(), case
        one = [dora[0]]
        for name, status, words in (("anna", 409, "enrolled already"), ("a/b", 422, "holds one of"),
                                    ("..", 422, "starts with '.'"), (" eve", 422, "spaces"), ("  ", 422, "empty"),
                                    ("", 422, "artist: Field required")):
            response = enroll(url, name, one)
            assert response.status == status and words in response.json()["error"], (name, response.data)
        assert HTTP.request("DELETE", f"{url}/v1/gallery/artists/nobody").status == 404
        missing = post(f"{url}/v1/gallery/artists/nobody/references", [upload(dora[0])])
        assert missing.status == 404 and "not in the gallery" in missing.json()["error"]
        # A failure while storing: the references folder cannot hold the artist's folder.
        refs.mkdir()
        (refs / "eve").write_text("in the way")
        failed = enroll(url, "eve", dora[:2])
        assert failed.status == 500 and "cannot store the references" in failed.json()["error"]
        # Another program changed the gallery on disk: the service does not overwrite its work.
        (gallery_dir / "gallery.json").write_bytes(stored + b"\n")
        conflict = enroll(url, "zoe", one)
        assert conflict.status == 409 and "changed on disk" in conflict.json()["error"]
        (gallery_dir / "gallery.json").write_bytes(stored)
        assert sorted(artists(url)) == ["anna", "ben", "cleo"]
        assert sorted(p.name for p in refs.iterdir()) == ["eve"] and (refs / "eve").is_file()
        assert (gallery_dir / "gallery.json").read_bytes() == stored
        # Concurrent writes are serialized: none is lost, and one name is enrolled once.
        with ThreadPoolExecutor(3) as pool:
            statuses = sorted(pool.map(lambda name: enroll(url, name, one).status, ["zoe", "yan", "zoe"]))
        assert statuses == [201, 201, 409]
        assert {a: e["references"] for a, e in artists(url).items()} == {"anna": 2, "ben": 2, "cleo": 2, "yan": 1,
                                                                          "zoe": 1}
        assert load_gallery(gallery_dir).artist_names == ["anna", "ben", "cleo", "yan", "zoe"]


def test_writes_need_the_key_and_no_key_beyond_localhost_refuses_them(served, base, dora, tmp_path):
    with served("open", host="0.0.0.0", metrics=False) as (url, _, _):
        for response in (enroll(url, "eve", dora[:1]), HTTP.request("DELETE", f"{url}/v1/gallery/artists/anna"),
                         HTTP.request("POST", f"{url}/v1/admin/reload")):
            assert response.status == 403 and "without an API key" in response.json()["error"], response.data
        assert sorted(artists(url)) == ["anna", "ben", "cleo"]
        assert post(f"{url}/v1/classify", [upload(dora[0])]).status == 200
        assert get(f"{url}/metrics").status == 404  # --no-metrics
    key = {"Authorization": "Bearer k3y"}
    with served("key", host="0.0.0.0", api_key="k3y") as (url, _, _):
        assert enroll(url, "eve", dora[:1]).status == 401
        assert HTTP.request("DELETE", f"{url}/v1/gallery/artists/anna").status == 401
        assert get(f"{url}/metrics").status == 401 and get(f"{url}/metrics", key).status == 200
        assert enroll(url, "eve", dora[:1], key).status == 201


def test_classify_during_enroll_and_reload_all_succeed_from_a_consistent_gallery(served, base, dora, tmp_path):
    with served(max_wait_ms=1) as (url, _, _):
        done, answers = threading.Event(), []

        def client(endpoint: str) -> None:
            while not done.is_set():
                try:
                    response = post(f"{url}/v1/{endpoint}?top_artists=10", [upload(dora[2])])
                    answers.append((endpoint, response.status, response.json()))
                except Exception as err:  # a dropped connection
                    answers.append((endpoint, 0, repr(err)))

        threads = [threading.Thread(target=client, args=(e,)) for e in ("classify", "classify", "similar")]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.2)
            assert enroll(url, "dora", dora[:3]).status == 201
            reloaded = HTTP.request("POST", f"{url}/v1/admin/reload")
            assert reloaded.status == 200 and reloaded.json()["reloads"] == 1
            time.sleep(0.2)
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=60)
    assert len(answers) > 6 and [a for a in answers if a[1] != 200] == []
    galleries = {tuple(sorted(a["artist"] for a in body["results"][0]["artists"]))
                 for endpoint, _, body in answers if endpoint == "similar"}
    assert galleries <= {("anna", "ben", "cleo"), ("anna", "ben", "cleo", "dora")}, galleries


def test_a_failed_reload_keeps_serving_and_a_reload_loads_what_changed_on_disk(served, base, dora, tmp_path):
    other = write_model_folder(tmp_path / "other", CLASSES)
    checkpoint = torch.load(other / "model_best.pth", weights_only=False)
    next(iter(checkpoint["model"].values())).add_(0.01)  # other weights than the base model's
    torch.save(checkpoint, other / "model_best.pth")
    build_gallery.main(build_gallery.get_args_parser().parse_args(
        ["--checkpoint", str(other), "--images", str(base[1].parent / "refs"), "--output-dir", str(tmp_path / "g2"),
         "--device", "cpu", "--num-workers", "0"]))
    with served() as (url, gallery_dir, app):
        info = get(f"{url}/v1/model").json()
        for paths, words in (({"checkpoint": str(tmp_path / "missing")}, "not found"),
                             ({"checkpoint": str(other)}, "built with another model")):
            failed = HTTP.request("POST", f"{url}/v1/admin/reload", json=paths)
            error = failed.json()["error"]
            assert failed.status == 422 and error.startswith(f"reload failed, still serving version {info['version']}")
            assert words in error and "\n" not in error, error
            assert post(f"{url}/v1/classify", [upload(dora[0])]).status == 200
        assert get(f"{url}/v1/model").json() == info
        # A new model folder with a gallery of its own: /v1/model reports the version served now.
        response = HTTP.request("POST", f"{url}/v1/admin/reload",
                                json={"checkpoint": str(other), "gallery": str(tmp_path / "g2")})
        assert response.status == 200, response.data
        new = get(f"{url}/v1/model").json()
        assert new == response.json() and new["version"] != info["version"] and new["reloads"] == 1
        assert new["gallery"]["unknown_threshold"] is None and json.loads((tmp_path / "g2" / "gallery.json").read_text(
            encoding="utf-8"))["model"]["checkpoint_sha256"].startswith(new["version"])
        # Another program changes the gallery on disk; SIGHUP loads it (the model folder too) without a restart.
        build_gallery.main(build_gallery.get_args_parser().parse_args(
            ["--output-dir", str(tmp_path / "g2"), "--remove", "anna"]))
        previous = signal.getsignal(signal.SIGHUP)
        serve.reload_on_sighup(app)
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + 30
            while get(f"{url}/v1/model").json()["reloads"] != 2:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
        finally:
            signal.signal(signal.SIGHUP, previous)
        assert sorted(artists(url)) == ["ben", "cleo"] and get(f"{url}/v1/model").json()["version"] == new["version"]
        assert post(f"{url}/v1/classify", [upload(dora[0])]).status == 200
    assert load_gallery(gallery_dir).artist_names == ["anna", "ben", "cleo"]  # the first gallery was not touched


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """``(sample name, sorted labels) -> value`` of a Prometheus text exposition, read by prometheus_client."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_the_requests_sent(served, base, dora, tmp_path):
    with served() as (url, _, _):
        for count in (1, 2, 1):
            assert post(f"{url}/v1/classify", [upload(p) for p in dora[:count]]).status == 200
        assert post(f"{url}/v1/classify", [("notes.png", b"not an image")]).status == 422
        assert get(f"{url}/v1/gallery/images/0").status == 200 and get(f"{url}/nowhere").status == 404
        assert enroll(url, "dora", dora[:2]).status == 201
        scraped = get(f"{url}/metrics")
    assert scraped.status == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = _samples(scraped.data.decode())

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    requests = "artist_http_requests_total"
    assert value(requests, route="/v1/classify", method="POST", status="200") == 3
    assert value(requests, route="/v1/classify", method="POST", status="422") == 1
    assert value(requests, route="/v1/gallery/images/{image_id}", method="GET", status="200") == 1
    assert value(requests, route="other", method="GET", status="404") == 1
    assert value(requests, route="/v1/gallery/artists", method="POST", status="201") == 1
    assert value("artist_http_request_duration_seconds_count", route="/v1/classify", method="POST", status="200") == 3
    assert value("artist_images_processed_total", kind="classify") == 4
    assert value("artist_model_batch_size_sum", kind="classify") == 4
    assert value("artist_model_batch_duration_seconds_count", kind="classify") == \
        value("artist_model_batch_size_count", kind="classify") >= 1
    assert value("artist_gallery_writes_total", operation="enroll", result="ok") == 1
    assert value("artist_gallery_artists") == 4 and value("artist_gallery_references") == 8
    assert value("artist_queue_depth") == 0 and value("artist_requests_in_flight") == 0

