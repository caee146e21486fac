"""serve.py and the service package on a real uvicorn: every endpoint, answers equal to the scripts', batching, the
limits, every kind of bad upload, the API key and CORS."""

import asyncio
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
import torch
import urllib3
from PIL import Image
from test_inference import make_model

import export
import inference_artist
import predict_artist_multilabel
import serve
from artifacts.glance_focus_folder import save_model_folder
from data import write_class_mapping
from model import create_glance_focus
from predictor import ArtistModel, load_model_bundle
from retrieval.gallery import load_gallery
from service import Settings, create_app
from service.batcher import DynamicBatcher
from service.server import bind, build_server
from tools import build_gallery, search_similar
from utils import UserError

CLASSES = ["Alice Artist", "Bob, the Painter", "Chloé"]
LABELS = ["Alice Artist", "Bob, the Painter", "Chloé", "d", "e"]
SIZE = 64
# Small limits, so that the tests reach each one with small files.
LIMITS = {"max_files": 3, "max_upload_mb": 0.25, "max_pixels": 300 * 300}
HTTP = urllib3.PoolManager(timeout=urllib3.Timeout(total=60), retries=False)


def write_model_folder(folder: Path, classes: list[str], multi_label: bool = False) -> Path:
    """A randomly initialised lsnet_t_artist model folder at 64 px, as training writes it."""
    net = make_model(num_classes=len(classes), feature_dim=16)
    if multi_label:
        with torch.no_grad():
            net.head.l.weight.mul_(0.2)  # confidences spread over (0, 1)
    config = {"model": "lsnet_t_artist", "num_classes": len(classes), "feature_dim": 16, "input_size": SIZE,
              "multi_label": multi_label}
    folder.mkdir(parents=True)
    torch.save({"model": net.state_dict(), "class_names": classes, "config": config}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", classes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("serve") / "model", CLASSES)


@pytest.fixture(scope="session")
def artist_model(model_dir):
    return load_model_bundle(model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve_images")
    for seed, size in enumerate([(90, 70), (70, 90), (120, 60), (64, 64), (80, 100), (100, 80)]):
        gen.noise_image(folder / f"img{seed}.png", size, seed=seed)
    gen.noise_image(folder / "photo.jpg", (96, 72), seed=10)
    return folder


@contextmanager
def running(server, sock) -> Iterator[str]:
    """Run a uvicorn ``server`` on the listening ``sock`` in a thread; yields its base URL."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` on a real uvicorn on a free 127.0.0.1 port; yields its base URL."""
    with running(build_server(app, log_level="warning"), bind("127.0.0.1", 0)) as url:
        yield url


@pytest.fixture(scope="module")
def server(artist_model) -> Iterator[str]:
    with serving(create_app(artist_model, Settings(**LIMITS))) as url:
        yield url


def post(url: str, files: list[tuple[str, bytes]], headers: dict[str, str] | None = None):
    """POST ``files`` as the multipart field 'files'; returns the response (``.status``, ``.json()``)."""
    fields = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return HTTP.request("POST", url, fields=fields, headers=headers)


def get(url: str, headers: dict[str, str] | None = None):
    return HTTP.request("GET", url, headers=headers)


def upload(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def assert_same_classification(ours: list[dict], reference: list[dict]) -> None:
    """The same classes in the same order; probabilities equal up to float32 rounding (batches of other sizes
    round differently)."""
    assert [e["class_id"] for e in ours] == [e["class_id"] for e in reference]
    assert [e["class_name"] for e in ours] == [e["class_name"] for e in reference]
    np.testing.assert_allclose([e["probability"] for e in ours], [e["probability"] for e in reference],
                               rtol=1e-5, atol=1e-6)


def test_classify_answers_as_inference_artist(server, model_dir, artist_model, images, tmp_path):
    names = ["photo.jpg", "img0.png"]
    response = post(f"{server}/v1/classify?top_k=2", [upload(images / n) for n in names])
    assert response.status == 200, response.data
    body = response.json()
    assert body["model"] == "lsnet_t_artist" and body["multi_label"] is False
    assert [r["file"] for r in body["results"]] == names
    assert all(set(result) == {"file", "classification"} for result in body["results"])
    inference_artist.main(inference_artist.get_args_parser().parse_args(
        ["--checkpoint", str(model_dir), "--input", str(images / "photo.jpg"), "--output", str(tmp_path),
         "--top-k", "2", "--device", "cpu", "--num-workers", "0"]))
    script = json.loads((tmp_path / "photo_result.json").read_text(encoding="utf-8"))
    assert len(script["classification"]) == 2
    assert_same_classification(body["results"][0]["classification"], script["classification"])
    assert_same_classification(body["results"][1]["classification"], artist_model.classify(images / "img0.png", 2))


def test_features_are_the_predictors(server, artist_model, images):
    response = post(f"{server}/v1/features", [upload(images / "img1.png"), upload(images / "img2.png")])
    assert response.status == 200, response.data
    body = response.json()
    assert body["feature_dim"] == 16 and [r["file"] for r in body["results"]] == ["img1.png", "img2.png"]
    expected = artist_model.extract_features([images / "img1.png", images / "img2.png"])
    np.testing.assert_allclose([r["features"] for r in body["results"]], expected, rtol=1e-5, atol=1e-6)


def test_model_health_page_and_docs(server, model_dir):
    info = get(f"{server}/v1/model").json()
    assert info["model"] == "lsnet_t_artist" and info["classes"] == CLASSES and info["num_classes"] == 3
    assert info["input_size"] == SIZE and info["feature_dim"] == 16 and info["multi_label"] is False
    assert info["checkpoint"] == "model_best.pth" and len(info["version"]) == 12 and info["gallery"] is None
    assert info["reloads"] == 0 and info["loaded_at"].endswith("+00:00")
    assert info["limits"]["max_files"] == 3 and info["limits"]["max_pixels"] == 300 * 300
    health = get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["in_flight"] == 0
    assert get(f"{server}/readyz").json() == {"status": "ready"}
    page = get(f"{server}/")
    assert page.status == 200 and b'src="static/app.js"' in page.data  # relative: works under a proxy's sub-path
    assert get(f"{server}/static/app.js").status == 200 and get(f"{server}/static/style.css").status == 200
    assert get(f"{server}/static/../../serve.py").status == 404
    assert b"swagger" in get(f"{server}/docs").data.lower()
    paths = get(f"{server}/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/features", "/v1/model", "/healthz", "/readyz", "/metrics", "/v1/gallery/artists",
            "/v1/admin/reload"} <= set(paths)


def bad_uploads(images: Path, tmp: Path) -> dict[str, tuple[list[tuple[str, bytes]], int, str, str | None]]:
    """Case name: (uploads, expected status, words of the error, the file it names)."""
    good = upload(images / "img0.png")
    truncated = gen.truncated_jpeg(tmp / "cut.jpg")
    bomb = gen.bomb_png(tmp / "bomb.png")
    big = tmp / "huge.png"
    Image.new("RGB", (320, 320), gen.RED).save(big)  # over 300 x 300 pixels, a few bytes
    return {
        "not an image": ([good, ("notes.png", b"this is not an image\n")], 422, "not an image", "notes.png"),
        "truncated": ([upload(truncated)], 422, "truncated", "cut.jpg"),
        "empty": ([("empty.png", b"")], 422, "empty file", "empty.png"),
        "decompression bomb": ([upload(bomb)], 413, "too large", "bomb.png"),
        "too many pixels": ([upload(big)], 413, "too large", "huge.png"),
        "oversized": ([("big.png", os.urandom(300 * 1024))], 413, "0.25 mb limit", None),
        "too many files": ([good] * 4, 400, "too many files", None),
        "no files": ([], 422, "files", None),
    }


def test_every_bad_upload_is_a_4xx_naming_the_file_and_the_service_keeps_serving(server, images, tmp_path):
    for case, (files, status, words, file) in bad_uploads(images, tmp_path).items():
        for endpoint in ("classify", "features"):
            response = post(f"{server}/v1/{endpoint}", files)
            assert response.status == status, (case, response.data)
            body = response.json()
            assert words in body["error"].lower() and body["file"] == file, (case, body)
            if file is not None:
                assert body["error"].startswith(f"{file}: "), body
            assert "\n" not in body["error"]
        # the same connection pool and the same service go on answering
        assert post(f"{server}/v1/classify", [upload(images / "img0.png")]).status == 200, case


def test_an_oversized_upload_without_content_length_is_stopped_while_read(server, images):
    body, content_type = urllib3.encode_multipart_formdata([("files", ("big.png", os.urandom(300 * 1024)))])
    chunks = (body[i:i + 16384] for i in range(0, len(body), 16384))
    response = HTTP.request("POST", f"{server}/v1/classify", body=chunks, chunked=True,
                            headers={"Content-Type": content_type})
    assert response.status == 413 and "0.25 MB limit" in response.json()["error"]
    assert post(f"{server}/v1/classify", [upload(images / "img0.png")]).status == 200


def test_concurrent_requests_are_batched_and_answer_as_serial(artist_model, images):
    names = [f"img{i}.png" for i in range(6)]
    serial = [artist_model.classify(images / name, top_k=3) for name in names]
    settings = Settings(**LIMITS, max_batch=8, max_wait_ms=400)
    with serving(create_app(artist_model, settings)) as url, ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda n: post(f"{url}/v1/classify?top_k=3", [upload(images / n)]), names))
        health = get(f"{url}/healthz").json()
    assert [r.status for r in responses] == [200] * len(names)
    for response, expected in zip(responses, serial, strict=True):
        assert_same_classification(response.json()["results"][0]["classification"], expected)
    assert health["images"] == len(names) and health["batches"] < len(names), health


def wait_for_in_flight(url: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while get(f"{url}/healthz").json()["in_flight"] != count:
        assert time.monotonic() < deadline, f"in_flight never became {count}"
        time.sleep(0.01)


def test_a_busy_service_answers_429(artist_model, images):
    with serving(create_app(artist_model, Settings(**LIMITS, max_queue=1))) as url:
        # A client that sends half of its upload and waits keeps one request in progress.
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as slow:
            slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
            wait_for_in_flight(url, 1)
            busy = post(f"{url}/v1/classify", [upload(images / "img1.png")])
            assert busy.status == 429 and busy.headers["Retry-After"] == "1"
            assert "busy" in busy.json()["error"] and get(f"{url}/v1/model").status == 200
        wait_for_in_flight(url, 0)  # the client went away
        assert post(f"{url}/v1/classify", [upload(images / "img1.png")]).status == 200


def test_api_key_guards_v1_only_and_cors_is_off_unless_asked(artist_model, images, server):
    settings = Settings(**LIMITS, api_key="s3cret key", cors_origins=("https://example.org",))
    with serving(create_app(artist_model, settings)) as url:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0IGtleQ=="}):
            response = get(f"{url}/v1/model", headers)
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
            assert "api key" in response.json()["error"].lower()
            assert post(f"{url}/v1/classify", [upload(images / "img0.png")], headers).status == 401
        key = {"Authorization": "Bearer s3cret key"}
        assert get(f"{url}/v1/model", key).status == 200
        assert post(f"{url}/v1/classify", [upload(images / "img0.png")], key).status == 200
        assert get(f"{url}/healthz").status == 200 and get(f"{url}/").status == 200
        preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization"}
        allowed = HTTP.request("OPTIONS", f"{url}/v1/classify", headers=preflight)
        assert allowed.headers.get("Access-Control-Allow-Origin") == "https://example.org"
        other = HTTP.request("OPTIONS", f"{url}/v1/classify", headers={**preflight, "Origin": "https://evil.test"})
        assert "Access-Control-Allow-Origin" not in other.headers
    default = HTTP.request("OPTIONS", f"{server}/v1/classify", headers=preflight)
    assert "Access-Control-Allow-Origin" not in default.headers
    assert "Access-Control-Allow-Origin" not in get(f"{server}/v1/model", {"Origin": "https://example.org"}).headers


def test_multilabel_model_answers_as_predict_artist_multilabel(tmp_path, images):
    folder = write_model_folder(tmp_path / "ml", LABELS, multi_label=True)
    with serving(create_app(load_model_bundle(folder, device="cpu"), Settings(**LIMITS))) as url:
        response = post(f"{url}/v1/classify?top_k=3&threshold=0.2", [upload(images / "img3.png")])
        info = get(f"{url}/v1/model").json()
    assert response.status == 200 and info["multi_label"] is True
    result = response.json()["results"][0]
    assert set(result) == {"file", "labels"}
    record = predict_artist_multilabel.main(predict_artist_multilabel.get_args_parser().parse_args(
        ["--checkpoint", str(folder), "--inputs", str(images / "img3.png"), "--output", str(tmp_path / "p.json"),
         "--top-k", "3", "--threshold", "0.2", "--normalize-ratio", "--device", "cpu", "--num-workers", "0"]))
    expected = next(iter(record["results"].values()))["labels"]
    assert [e["label"] for e in result["labels"]] == [e["label"] for e in expected]
    for key in ("confidence", "ratio"):
        np.testing.assert_allclose([e[key] for e in result["labels"]], [e[key] for e in expected], rtol=1e-5)
    assert expected and sum(e["ratio"] for e in result["labels"]) == pytest.approx(1.0)


def test_settings_and_addresses_are_checked():
    with pytest.raises(UserError, match="--max-batch must be at least 1"):
        Settings(max_batch=0)
    with pytest.raises(UserError, match="API key is empty"):
        Settings(api_key=" ")
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    assert serve.get_args_parser().parse_args(["--checkpoint", "m"]).host == "127.0.0.1"


def test_answers_leave_without_waiting_for_the_clients_ack(artist_model):
    """Accepted connections have TCP_NODELAY: without it an answer written in two parts (headers, body) held its
    body until the client's delayed ACK, 40 ms on Linux, which capped 8 one-image clients far below the model."""
    server = build_server(create_app(artist_model, Settings(**LIMITS)), log_level="warning")
    with running(server, bind("127.0.0.1", 0)) as url:
        http = urllib3.PoolManager(retries=False)  # one kept-alive connection
        seconds = []
        for _ in range(8):
            start = time.perf_counter()
            assert http.request("GET", f"{url}/healthz").status == 200
            seconds.append(time.perf_counter() - start)
        sockets = [connection.transport.get_extra_info("socket") for connection in server.server_state.connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
    assert np.median(seconds) < 0.025, seconds  # 0.044 each with Nagle's algorithm


def test_serve_script_takes_the_api_key_from_the_environment(model_dir, images, monkeypatch, capsys):
    monkeypatch.setenv("ARTIST_API_KEY", "from-env")
    args = serve.get_args_parser().parse_args(["--checkpoint", str(model_dir), "--port", "0", "--device", "cpu",
                                               "--log-level", "warning", "--max-files", "2"])
    with running(*serve.prepare(args)) as url:
        assert f"serving lsnet_t_artist (3 classes) on {url}/" in capsys.readouterr().out
        assert get(f"{url}/v1/model").status == 401
        key = {"Authorization": "Bearer from-env"}
        assert get(f"{url}/v1/model", key).json()["limits"]["max_files"] == 2
        response = post(f"{url}/v1/classify", [upload(images / "img0.png")], key)
        assert response.status == 200 and response.json()["results"][0]["classification"]


def test_an_exported_onnx_folder_is_served_like_its_pytorch_model(model_dir, artist_model, images, tmp_path):
    """serve.py on an export.py folder (onnxruntime, no PyTorch model): the same classes and style vectors."""
    exported = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(model_dir), "--output-dir", str(tmp_path / "onnx")]))
    args = serve.get_args_parser().parse_args(["--checkpoint", str(exported), "--port", "0", "--log-level", "warning"])
    names = ["photo.jpg", "img0.png"]
    with running(*serve.prepare(args)) as url:
        assert get(f"{url}/v1/model").json()["model"] == "lsnet_t_artist"
        classified = post(f"{url}/v1/classify?top_k=3", [upload(images / n) for n in names])
        features = post(f"{url}/v1/features", [upload(images / n) for n in names])
    assert classified.status == 200 and features.status == 200, (classified.data, features.data)
    for result, name in zip(classified.json()["results"], names, strict=True):
        reference = artist_model.classify(images / name, 3)
        assert [e["class_id"] for e in result["classification"]] == [e["class_id"] for e in reference]
        np.testing.assert_allclose([e["probability"] for e in result["classification"]],
                                   [e["probability"] for e in reference], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose([r["features"] for r in features.json()["results"]],
                               artist_model.extract_features([images / n for n in names]), rtol=1e-3, atol=1e-4)


def test_a_glance_and_focus_folder_serves_and_builds_galleries(gallery_dir, images, tmp_path):
    """A GF folder is served like its predictor and has a gallery identity (weights file, preprocessing), so
    galleries built with it work in the service."""
    torch.manual_seed(0)
    net = create_glance_focus("lsnet_t_gf", num_classes=3, glance_size=64, patch_size=32, focus_steps=2).eval()
    save_model_folder(net, "lsnet_t_gf", tmp_path / "gf", CLASSES)
    refs = gallery_dir.parent / "refs"
    build_gallery.main(build_gallery.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "gf"), "--images", str(refs), "--output-dir", str(tmp_path / "gallery")]))
    args = serve.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "gf"), "--port", "0",
                                               "--gallery", str(tmp_path / "gallery")])
    with running(*serve.prepare(args)) as url:
        info = get(f"{url}/v1/model").json()
        response = post(f"{url}/v1/classify?top_k=3", [upload(images / "img1.png")])
        similar = post(f"{url}/v1/similar?top_k=2", [upload(refs / "ben" / "1.png")])
    assert info["model"] == "lsnet_t_gf" and info["version"] != "unknown" and info["gallery"]["works"] == 6
    assert response.status == 200 and similar.status == 200, (response.data, similar.data)
    reference = load_model_bundle(tmp_path / "gf").classify(images / "img1.png", 3)
    result = response.json()["results"][0]
    assert_same_classification(result["classification"], reference)
    assert result["glance_focus"]["steps"] == 2 and len(result["glance_focus"]["boxes"]) == 2
    assert similar.json()["results"][0]["works"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # its own vector


def test_serve_main_reports_a_missing_model_in_one_line(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        serve.main(serve.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "nothing"), "--port", "0"]))


def test_a_failing_model_call_is_a_json_500_and_the_service_keeps_serving(artist_model, images):
    # Class names that do not fit the head: the batch fails inside the model thread (IndexError in the top-k).
    broken = ArtistModel(artist_model.model, artist_model.transform, ["only one"], device="cpu",
                         model_name="lsnet_t_artist", data_config=artist_model.data_config)
    with serving(create_app(broken, Settings(**LIMITS))) as url:
        response = post(f"{url}/v1/classify", [upload(images / "img0.png")])
        assert response.status == 500 and "model failed on this batch (IndexError" in response.json()["error"]
        assert post(f"{url}/v1/features", [upload(images / "img0.png")]).status == 200
        assert get(f"{url}/readyz").status == 200


def build_test_gallery(root: Path, model_dir: Path) -> Path:
    """``root/gallery``: a gallery of the model of 3 artists x 2 generated works (``root/refs``), calibrated on 2
    more images each (``root/calib``)."""
    for part, count in (("refs", 2), ("calib", 2)):
        for a, artist in enumerate(["anna", "ben", "cleo"]):
            (root / part / artist).mkdir(parents=True)
            for i in range(count):
                gen.noise_image(root / part / artist / f"{i}.png", (72, 64), seed=100 * a + 10 * (part == "calib") + i)
    build_gallery.main(build_gallery.get_args_parser().parse_args(
        ["--checkpoint", str(model_dir), "--images", str(root / "refs"), "--output-dir", str(root / "gallery"),
         "--calibrate", str(root / "calib"), "--device", "cpu", "--num-workers", "0"]))
    return root / "gallery"


@pytest.fixture(scope="module")
def gallery_dir(model_dir, tmp_path_factory) -> Path:
    return build_test_gallery(tmp_path_factory.mktemp("serve_gallery"), model_dir)


def test_similar_answers_as_search_similar_and_serves_only_gallery_thumbnails(model_dir, gallery_dir, images,
                                                                              server, capsys, tmp_path):
    assert post(f"{server}/v1/similar", [upload(images / "img0.png")]).status == 404  # no gallery there
    args = serve.get_args_parser().parse_args(["--checkpoint", str(model_dir), "--gallery", str(gallery_dir),
                                               "--port", "0", "--device", "cpu", "--log-level", "warning"])
    gallery = load_gallery(gallery_dir)
    reference = gallery.paths[4]  # a gallery work as the query: it is its own nearest work
    with running(*serve.prepare(args)) as url:
        assert "gallery of 3 artists" in capsys.readouterr().out
        info = get(f"{url}/v1/model").json()["gallery"]
        assert info == {"artists": 3, "works": 6, "unknown_threshold": gallery.unknown_threshold,
                        "artist_thresholds": gallery.artist_thresholds, "index": "flat_ip"}
        assert sorted(info["artist_thresholds"]) == ["anna", "ben", "cleo"]  # what decides "unknown"
        response = post(f"{url}/v1/similar?top_k=3&top_artists=2", [upload(Path(reference)),
                                                                    upload(images / "photo.jpg")])
        assert response.status == 200, response.data
        assert response.json()["artist_thresholds"] == gallery.artist_thresholds
        own, other = response.json()["results"]
        # A random model's style vectors are close together: check scores and ids, not the order of near-ties.
        top = own["works"][0]
        assert top["score"] == pytest.approx(1.0, abs=1e-4) and 4 in [w["id"] for w in own["works"]]
        expected = search_similar.main(search_similar.get_args_parser().parse_args(
            ["--gallery", str(gallery_dir), "--checkpoint", str(model_dir), "--query", str(images / "photo.jpg"),
             "--top-k", "3", "--output", str(tmp_path / "s.json"), "--device", "cpu", "--num-workers", "0"]))
        np.testing.assert_allclose([w["score"] for w in other["works"]], [r["score"] for r in expected], atol=1e-4)
        assert gallery.descriptor == "texture" and get(f"{url}/v1/model").json()["descriptor"] == "texture"
        bundle = load_model_bundle(model_dir, device="cpu")
        bundle.use_descriptor("texture")  # the service uses the gallery's style vector
        vector = bundle.extract_features([images / "photo.jpg"])[0]
        unit = vector / np.linalg.norm(vector)
        for work in other["works"]:
            assert work["score"] == pytest.approx(float(gallery.vectors[work["id"]] @ unit), abs=1e-4)
            assert work["artist"] == gallery.artists[work["id"]]
            assert work["name"] == Path(gallery.paths[work["id"]]).name
        match = gallery.match(vector[None], 2)[0]  # judged by the closest artist's own threshold
        assert other["unknown"] == match["unknown"]
        np.testing.assert_allclose([a["score"] for a in other["artists"]], [a["score"] for a in match["artists"]],
                                   atol=1e-4)

        thumb = get(f"{url}/{own['works'][0]['thumbnail']}")
        assert thumb.status == 200 and thumb.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumb.data)) as image:
            assert image.size == Image.open(reference).size  # small works keep their size
        assert get(f"{url}/v1/gallery/images/6").status == 404
        for bad in ("-1", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
            assert get(f"{url}/v1/gallery/images/{bad}").status in (404, 422)


def test_a_gallery_of_another_model_is_refused_at_start(gallery_dir, tmp_path):
    other = write_model_folder(tmp_path / "other", CLASSES)
    checkpoint = torch.load(other / "model_best.pth", weights_only=False)
    next(iter(checkpoint["model"].values())).add_(0.01)  # other weights, whatever the random state was
    torch.save(checkpoint, other / "model_best.pth")
    args = serve.get_args_parser().parse_args(["--checkpoint", str(other), "--gallery", str(gallery_dir),
                                               "--port", "0", "--device", "cpu"])
    with pytest.raises(UserError, match="built with another model"):
        serve.prepare(args)


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_batcher_runs_up_to_lanes_batches_at_once(lanes):
    """Two requests, the second sent while the first's batch runs: with two lanes both batches are on the model at
    once (each waits for the other), with one they take turns; each request gets its own results."""
    both_running = threading.Barrier(2, timeout=1)
    started = threading.Event()
    concurrent = []

    def run(key, batch):
        started.set()
        try:
            both_running.wait()
            concurrent.append(True)
        except threading.BrokenBarrierError:
            concurrent.append(False)
        return [(key, image.size) for image in batch]

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=8, max_wait_s=0.0, lanes=lanes)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("a", [Image.new("RGB", (3, 2))]))
        while not started.is_set():  # the first batch runs
            await asyncio.sleep(0.001)
        second = await batcher.submit("b", [Image.new("RGB", (5, 4)), Image.new("RGB", (7, 6))])
        results = await first, second
        await batcher.stop()
        return results, batcher.batches

    results, batches = asyncio.run(scenario())
    assert results == ([("a", (3, 2))], [("b", (5, 4)), ("b", (7, 6))]) and batches == 2
    assert concurrent == ([True, True] if lanes == 2 else [False, False])


@pytest.mark.parametrize("lanes", [1, 2])
def test_images_arriving_together_spread_over_the_lanes(lanes):
    """Eight images submitted at once: one lane runs them in one batch; two lanes run two batches of four at the same
    time, without waiting for more images (the first batch took all eight before and the other lane idled)."""
    both_running = threading.Barrier(lanes, timeout=5)
    sizes = []

    def run(key, batch):
        sizes.append(len(batch))
        both_running.wait()
        return [image.size for image in batch]

    async def scenario():
        batcher = DynamicBatcher(run, max_batch=8, max_wait_s=60.0, lanes=lanes)
        await batcher.start()
        images = [Image.new("RGB", (i + 1, 1)) for i in range(8)]
        results = await asyncio.wait_for(batcher.submit("k", images), 10)
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [(i + 1, 1) for i in range(8)]
    assert sizes == ([8] if lanes == 1 else [4, 4])
