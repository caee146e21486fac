"""The engine choice (deploy/engine.py): auto runs onnxruntime on a cached, verified export; the thread policy."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
import torch
from test_inference import make_model
from test_serve import get, post, running, upload

import inference_artist
import serve
from artifacts.model_source import resolve_model_source
from data import ImageLoadError, write_class_mapping
from deploy.engine import cache_key, entry_dir
from inference.pipeline import ordered_map
from inference.threads import MAX_LANES, SPINNING_KEY, compute_threads, onnx_lanes, onnx_thread_settings
from predictor import ArtistModel, OnnxModel, load_model_bundle
from retrieval.gallery import model_identity
from service.engine import file_version
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["alice", "bob", "carol", "dave"]


def write_folder(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    net = make_model(num_classes=len(CLASSES), feature_dim=16, seed=seed)
    torch.save({"model": net.state_dict()}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", CLASSES)
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "input_size": 64}))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A model folder, images, and an engine cache of this module's own (LSNET_CACHE); scripts default to auto."""
    tmp = tmp_path_factory.mktemp("engine")
    images = tmp / "images"
    for i, size in enumerate([(90, 70), (70, 90), (120, 60), (64, 64), (80, 100)]):
        gen.noise_image(images / f"img{i}.png", size, seed=i)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LSNET_CACHE", str(tmp / "cache"))
        patch.delenv("LSNET_ENGINE")
        yield write_folder(tmp / "model", seed=0), images


@pytest.fixture(scope="module")
def pytorch(env) -> ArtistModel:
    return load_model_bundle(env[0], engine="torch")


def onnx_entry(folder: Path) -> Path:
    return entry_dir(cache_key(resolve_model_source(folder), {}))


def test_auto_exports_once_then_reuses_the_cache_and_matches_pytorch(env, pytorch, capsys, tmp_path):
    folder, images = env
    exported = load_model_bundle(folder, engine="auto")
    assert isinstance(exported, OnnxModel) and "engine: exporting" in capsys.readouterr().err
    onnx_file = onnx_entry(folder) / "model.onnx"
    written = onnx_file.stat().st_mtime_ns
    cached = load_model_bundle(folder, engine="auto", decode_threads=2)
    assert isinstance(cached, OnnxModel) and capsys.readouterr().err == "" and onnx_file.stat().st_mtime_ns == written
    assert cached.session.get_session_options().get_session_config_entry(SPINNING_KEY) == "0"
    assert isinstance(pytorch, ArtistModel) and isinstance(load_model_bundle(folder), ArtistModel)  # API default
    ours, theirs = cached.run_directory(images, "both"), pytorch.run_directory(images, "both")
    assert [c[0]["class_id"] for c in ours.classifications] == [c[0]["class_id"] for c in theirs.classifications]
    assert np.abs(ours.features - theirs.features).max() <= 1e-4 * np.abs(theirs.features).max()
    for model in (cached, pytorch):
        model.use_descriptor("texture")
    texture = [model.extract_features([images / "img0.png"]) for model in (cached, pytorch)]
    assert np.abs(texture[0] - texture[1]).max() <= 1e-4 * np.abs(texture[1]).max()
    assert model_identity(cached) == model_identity(pytorch)  # galleries built with either engine serve both
    pytorch.use_descriptor("pooled")
    # The script's default engine is auto: the cached export, the same classes.
    inference_artist.main(inference_artist.get_args_parser().parse_args(
        ["--checkpoint", str(folder), "--input", str(images), "--output", str(tmp_path / "out")]))
    assert capsys.readouterr().err.count("exporting") == 0 and onnx_file.stat().st_mtime_ns == written
    results = json.loads((tmp_path / "out" / "batch_results.json").read_text())["results"]
    assert [results[n]["classification"][0]["class_id"] for n in ours.names] == [
        c[0]["class_id"] for c in theirs.classifications]


def test_the_cache_entry_changes_with_the_checkpoint(env, tmp_path):
    folder, _ = env
    retrained = write_folder(tmp_path / "model", seed=1)
    assert onnx_entry(retrained) != onnx_entry(folder) and not onnx_entry(retrained).exists()
    assert onnx_entry(folder) == entry_dir(cache_key(resolve_model_source(folder), {}))  # stable



def test_a_cached_run_starts_without_torch(env, tmp_path):
    """inference_artist.py on a cached engine imports neither torch nor timm (the cache key is made from the files)
    and gives the PyTorch engine's classes; another class_mapping.csv is another key."""
    folder, images = env
    load_model_bundle(folder, engine="auto")  # cached (the first test exported it when run alone)
    script = ("import runpy, sys; sys.argv = ['inference_artist.py', *sys.argv[1:]]\n"
              "runpy.run_path('inference_artist.py', run_name='__main__')\n"
              "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, "--checkpoint", str(folder), "--input", str(images),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "[]" and "exporting" not in done.stderr
    results = json.loads((tmp_path / "out" / "batch_results.json").read_text())["results"]
    reference = load_model_bundle(folder, engine="torch").classify(sorted(images.iterdir()), top_k=1)
    assert [results[p.name]["classification"][0]["class_id"] for p in sorted(images.iterdir())] == [
        r[0]["class_id"] for r in reference]
    renamed = tmp_path / "renamed.csv"
    write_class_mapping(renamed, [name.upper() for name in CLASSES])
    assert entry_dir(cache_key(resolve_model_source(folder, renamed), {})) != onnx_entry(folder)

def test_the_service_runs_on_the_cached_onnx_engine(env, pytorch, capsys):
    folder, images = env
    load_model_bundle(folder, engine="auto")  # cached (the first test exported it when run alone)
    capsys.readouterr()
    args = serve.get_args_parser().parse_args(["--checkpoint", str(folder), "--port", "0", "--log-level", "warning"])
    with running(*serve.prepare(args)) as url:
        info = get(f"{url}/v1/model").json()
        classified = post(f"{url}/v1/classify?top_k=2", [upload(images / "img1.png"), upload(images / "img2.png")])
    assert "exporting" not in capsys.readouterr().err
    assert info["version"] == file_version(folder / "model_best.pth") and classified.status == 200
    reference = pytorch.classify([images / "img1.png", images / "img2.png"], top_k=2)
    assert [r["classification"][0]["class_id"] for r in classified.json()["results"]] == [
        r[0]["class_id"] for r in reference]


def test_a_corrupt_cache_entry_is_exported_again_with_a_one_line_notice(env, capsys):
    folder, images = env
    load_model_bundle(folder, engine="auto")
    onnx_file = onnx_entry(folder) / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])  # a truncated file
    capsys.readouterr()
    model = load_model_bundle(folder, engine="auto")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: the cached ONNX engine") and "exporting it again" in err
    assert isinstance(model, OnnxModel) and len(model.run_directory(images).names) == 5


def test_glance_and_focus_folders_fall_back_to_pytorch_with_one_line(tmp_path, capsys):
    """A folder whose config.json says glance-and-focus goes to PyTorch's loader (here: it reports the missing
    weights) after one line saying why; --engine onnx refuses it."""
    folder = tmp_path / "gf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_gf", "gf": {"glance_size": 64}}))
    write_class_mapping(folder / "class_mapping.csv", CLASSES)
    with pytest.raises(UserError, match="checkpoint not found: .*model_best.pth"):
        load_model_bundle(folder, engine="auto")
    why = "glance-and-focus folders are not exported to ONNX"
    assert capsys.readouterr().err == f"engine: PyTorch for {folder} ({why})\n"
    with pytest.raises(UserError, match="--engine onnx cannot run .*glance-and-focus"):
        load_model_bundle(folder, engine="onnx")
    with pytest.raises(UserError, match="unknown engine 'tensorrt'"):
        load_model_bundle(folder, engine="tensorrt")


def test_threads_follow_the_affinity(monkeypatch):
    """Threads come from data.scan.usable_cpus (affinity and cgroup quota; its quota parsing: test_cli)."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from inference.threads import compute_threads; print(compute_threads())")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.split() == ["1"], result.stderr
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert compute_threads() == 3 and onnx_lanes(2) == 3 and onnx_thread_settings(2) == (1, {SPINNING_KEY: "0"})
    assert onnx_lanes(0) == 1 and onnx_thread_settings(0) == (3, {SPINNING_KEY: "1"})
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # at most MAX_LANES lanes, the cores shared among them
    assert onnx_lanes(1) == MAX_LANES == 4 and onnx_thread_settings(1)[0] == 2


def test_lsnet_engine_sets_the_scripts_default(monkeypatch):
    monkeypatch.setenv("LSNET_ENGINE", "onnx")
    assert serve.get_args_parser().parse_args(["--checkpoint", "m"]).engine == "onnx"
    monkeypatch.setenv("LSNET_ENGINE", "tensorrt")
    with pytest.raises(UserError, match="LSNET_ENGINE='tensorrt' is not an engine"):
        serve.get_args_parser()


def test_lanes_give_the_serial_results_in_order_and_a_broken_file_is_one_line(env, tmp_path, capsys, monkeypatch):
    """Batches on two lanes at once: the same names, order and outputs as one batch after the other; a truncated
    JPEG among them is skipped with one warning line and loses no other image (or raises without skipping)."""
    folder, images = env
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    model = load_model_bundle(folder, engine="onnx", decode_threads=2)
    assert isinstance(model, OnnxModel) and model.lanes == 2
    paths = sorted(images.iterdir())
    paths.insert(3, gen.truncated_jpeg(tmp_path / "broken.jpg"))
    capsys.readouterr()
    laned = model.run_paths(paths, "both", batch_size=2, num_workers=2)
    warnings = capsys.readouterr().err.splitlines()
    serial = model.run_paths(paths, "both", batch_size=2, num_workers=0)
    assert laned.names == serial.names == [str(p) for p in paths if p.name != "broken.jpg"]
    assert np.array_equal(laned.features, serial.features) and laned.classifications == serial.classifications
    assert [s.path for s in laned.skipped] == [str(paths[3])]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping {paths[3]} (")
    one_lane = load_model_bundle(folder, engine="onnx")  # the API default: one lane, each batch decoded by threads
    pooled = one_lane.run_paths(paths, "both", batch_size=2, num_workers=2)
    assert one_lane.lanes == 1 and pooled.names == serial.names and pooled.skipped == laned.skipped
    np.testing.assert_allclose(pooled.features, serial.features, rtol=1e-5, atol=1e-6)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        model.run_paths(paths, batch_size=2, num_workers=2, skip_unreadable=False)


def test_ordered_map_keeps_the_order_bounds_the_work_in_flight_and_stops_at_an_error():
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        time.sleep(0.02 * (item % 3 == 0))  # early items finish last
        if item == 5:
            raise ValueError("item 5")
        return item * item

    results = ordered_map(work, range(5), workers=3)
    assert list(results) == [i * i for i in range(5)]
    started.clear()
    got = []
    with pytest.raises(ValueError, match="item 5"):
        for value in ordered_map(work, iter(range(100)), workers=3):
            got.append(value)
    assert got == [i * i for i in range(5)] and max(started) <= 5 + 3  # at most workers + 1 items ahead


def test_the_onnx_service_answers_concurrent_clients_on_two_lanes(env, pytorch, monkeypatch):
    """8 clients at once, one image each, on a model of two lanes: each gets its own image's answer."""
    folder, images = env
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    args = serve.get_args_parser().parse_args(["--checkpoint", str(folder), "--port", "0", "--log-level", "warning",
                                               "--engine", "onnx", "--max-wait-ms", "5"])
    paths = [images / f"img{i % 5}.png" for i in range(16)]
    with running(*serve.prepare(args)) as url, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post(f"{url}/v1/classify?top_k=2", [upload(p)]), paths))
        health = get(f"{url}/healthz").json()
    reference = pytorch.classify(paths, top_k=2)
    assert [r.status for r in responses] == [200] * len(paths) and health["images"] == len(paths)
    assert [r.json()["results"][0]["classification"][0]["class_id"] for r in responses] == [
        r[0]["class_id"] for r in reference]
