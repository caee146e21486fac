"""inference_artist.py and predictor: outputs of every mode, skipped files, model folders, old checkpoints, errors."""

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

import model  # noqa: F401  (registers the models)
from data import ImageLoadError, load_image, write_class_mapping
from data.transforms import normalize_batch
from inference.compiled import PaddedCompiledModel
from inference_artist import get_args_parser, main
from model.lsnet import BN_Linear, Conv2d_BN
from predictor import ArtistModel, build_eval_transform, list_images, load_model_bundle
from utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).parent / "reference"
CLASSES = ["Alice Artist", "Bob, the Painter", "Chloé"]
FEATURE_DIM = 16
SIZE = 64
READABLE = ["a/same.png", "b/same.png", "c/rgba.png", "top.jpg", "wide.PNG"]


def make_model(name: str = "lsnet_t_artist", num_classes: int = len(CLASSES), feature_dim: int = FEATURE_DIM,
               seed: int = 0) -> torch.nn.Module:
    """A freshly initialised eval-mode model with random BN statistics and a sharp head (distinct outputs)."""
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=num_classes, feature_dim=feature_dim)
    gen_ = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen_) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen_) + 0.5)
    with torch.no_grad():
        net.head.l.weight.normal_(0, 1.0, generator=gen_)
    return net.eval()


def write_model_folder(folder: Path) -> Path:
    """A training-style model folder of :func:`make_model`: ``model_best.pth``, ``class_mapping.csv``, ``config.json``
    at :data:`SIZE` px."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": make_model().state_dict()}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", CLASSES)
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "input_size": SIZE}))
    return folder


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(transform, image: Image.Image) -> torch.Tensor:
    """A bundle's uint8 preprocessing completed by the batched normalisation, for one image."""
    return normalize_batch(transform(image)[None], IMAGENET_MEAN, IMAGENET_STD)[0]


def assert_same_preprocessing(ours: torch.Tensor, reference: torch.Tensor, name: str = "") -> None:
    """Equal up to the resampling rounding of data.transforms.ResizeCenterCrop (tests/test_transforms.py)."""
    levels = (ours - reference).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    assert levels.max() <= 20.01 and levels.mean() < 0.5, name


def direct_outputs(net: torch.nn.Module, transform, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and probabilities of the unfused model on the same preprocessing, in one batch."""
    with torch.no_grad():
        batch = torch.stack([preprocess(transform, load_image(p)) for p in paths])
        features, logits = net(batch, return_both=True)
    return features, logits.softmax(dim=1)


def run(*argv: str):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A training output folder, a model bundle loaded from it, and an image folder with awkward files."""
    tmp = tmp_path_factory.mktemp("inference")
    net = make_model()
    run_dir = tmp / "run"
    run_dir.mkdir()
    torch.save({"model": net.state_dict(), "epoch": 3,
                "args": {"model": "lsnet_t_artist", "input_size": SIZE, "feature_dim": FEATURE_DIM}},
               run_dir / "model_best.pth")
    write_class_mapping(run_dir / "class_mapping.csv", CLASSES)
    (run_dir / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "num_classes": len(CLASSES),
                                                     "feature_dim": FEATURE_DIM, "input_size": SIZE}))
    images = tmp / "images"
    gen.noise_image(images / "a" / "same.png", (90, 70), seed=1)
    gen.noise_image(images / "b" / "same.png", (70, 90), seed=2)  # same file name, another sub-folder
    gen.rgba_png(images / "c" / "rgba.png", alpha=128)
    gen.noise_image(images / "top.jpg", (80, 80), seed=3)
    gen.noise_image(images / "wide.PNG", (160, 60), seed=4)
    gen.truncated_jpeg(images / "b" / "broken.jpg")
    gen.text_file(images / "notes.txt")
    gen.noise_image(images / ".hidden" / "ignored.png", seed=5)
    bundle = load_model_bundle(run_dir, device="cpu")
    return argparse.Namespace(tmp=tmp, net=net, run_dir=run_dir, images=images, bundle=bundle)


def test_eval_transform_is_the_original_pipeline(env):
    original = transforms.Compose([
        transforms.Resize(int(SIZE / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(SIZE), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    for name in READABLE:
        image = load_image(env.images / name)
        assert env.bundle.transform(image).dtype == torch.uint8  # decoding workers pass uint8 crops
        assert_same_preprocessing(preprocess(env.bundle.transform, image), original(image), name)
    _, config = build_eval_transform(env.net)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    assert config["interpolation"] == "bicubic"


def test_bundle_detects_everything_from_the_folder(env):
    bundle = env.bundle
    assert bundle.model_name == "lsnet_t_artist" and bundle.class_names == CLASSES
    assert bundle.feature_dim == FEATURE_DIM and bundle.input_size == SIZE
    assert bundle.checkpoint == env.run_dir / "model_best.pth"
    assert not any(isinstance(m, Conv2d_BN | BN_Linear) for m in bundle.model.modules()), "BN not fused"


def test_list_images(env):
    assert list_images(env.images) == ["a/same.png", "b/broken.jpg", "b/same.png", "c/rgba.png", "top.jpg",
                                       "wide.PNG"]
    assert list_images(env.images, recursive=False) == ["top.jpg", "wide.PNG"]


def test_directory_both_mode_outputs_align_with_direct_model(env, capsys):
    out = env.tmp / "out_both"
    run("--checkpoint", env.run_dir, "--input", env.images, "--output", out, "--mode", "both",
        "--num-workers", "2", "--batch-size", "2", "--top-k", "2")
    names = (out / "image_names.txt").read_text(encoding="utf-8").splitlines()
    assert names == READABLE
    features = np.load(out / "features.npy")
    assert features.dtype == np.float32 and features.shape == (len(READABLE), FEATURE_DIM)

    direct_features, direct_probs = direct_outputs(env.net, env.bundle.transform, [env.images / n for n in names])
    torch.testing.assert_close(torch.from_numpy(features), direct_features, rtol=1e-4, atol=1e-5)

    report = json.loads((out / "batch_results.json").read_text(encoding="utf-8"))
    assert report["mode"] == "both" and report["num_images"] == len(READABLE) and report["num_skipped"] == 1
    assert list(report["results"]) == names
    assert [s["path"] for s in report["skipped"]] == ["b/broken.jpg"]
    assert report["skipped"][0]["reason"].startswith("truncated")
    for i, name in enumerate(names):
        entry = report["results"][name]
        np.testing.assert_allclose(entry["features"], features[i], rtol=1e-6)
        top = entry["classification"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
        expected = direct_probs[i].topk(2)
        assert [c["class_id"] for c in top] == expected.indices.tolist()
        assert [c["class_name"] for c in top] == [CLASSES[j] for j in expected.indices.tolist()]
        np.testing.assert_allclose([c["probability"] for c in top], expected.values.numpy(), rtol=1e-4)
    err = capsys.readouterr().err
    assert err.count("warning: skipping b/broken.jpg") == 1


@pytest.mark.parametrize("mode", ["classify", "cluster"])
def test_directory_single_modes(env, mode):
    out = env.tmp / f"out_{mode}"
    run("--checkpoint", env.run_dir, "--input", env.images, "--output", out, "--mode", mode, "--num-workers", "0",
        "--no-recursive", "--threshold", "0.2")
    report = json.loads((out / "batch_results.json").read_text(encoding="utf-8"))
    assert list(report["results"]) == ["top.jpg", "wide.PNG"] and report["skipped"] == []
    for entry in report["results"].values():
        assert ("classification" in entry) == (mode == "classify")
        assert ("features" in entry) == (mode == "cluster")
        assert all(c["probability"] >= 0.2 for c in entry.get("classification", []))
    assert (out / "features.npy").exists() == (mode == "cluster")
    assert (out / "image_names.txt").exists() == (mode == "cluster")


def test_no_json_features_keeps_features_npy(env):
    out = env.tmp / "out_nojson"
    run("--checkpoint", env.run_dir, "--input", env.images, "--output", out, "--mode", "both", "--num-workers", "0",
        "--no-json-features")
    report = json.loads((out / "batch_results.json").read_text(encoding="utf-8"))
    assert all(set(entry) == {"classification"} for entry in report["results"].values())
    assert np.load(out / "features.npy").shape == (len(READABLE), FEATURE_DIM)


@pytest.mark.parametrize("mode", ["classify", "cluster", "both"])
def test_single_image(env, mode, capsys):
    out = env.tmp / f"single_{mode}"
    image = env.images / "a" / "same.png"
    run("--checkpoint", env.run_dir, "--input", image, "--output", out, "--mode", mode, "--top-k", "3")
    result = json.loads((out / "same_result.json").read_text(encoding="utf-8"))
    direct_features, direct_probs = direct_outputs(env.net, env.bundle.transform, [image])
    if mode == "cluster":
        assert "classification" not in result
    else:
        assert [c["class_id"] for c in result["classification"]] == direct_probs[0].argsort(descending=True).tolist()
        assert result["classification"][0]["class_name"] in capsys.readouterr().out
    if mode == "classify":
        assert "features" not in result
    else:
        torch.testing.assert_close(torch.tensor(result["features"]), direct_features[0], rtol=1e-4, atol=1e-5)


def test_api_accepts_pil_images_paths_and_files(env):
    bundle = env.bundle
    path = env.images / "top.jpg"
    by_path = bundle.classify(path, top_k=3)
    assert bundle.classify(Image.open(path)) == by_path
    assert bundle.classify(io.BytesIO(path.read_bytes())) == by_path
    assert sum(c["probability"] for c in by_path) == pytest.approx(1.0, abs=1e-5)
    assert all(c["probability"] >= 0.3 for c in bundle.classify(path, top_k=3, threshold=0.3))
    assert len(bundle.classify(path, top_k=1)) == 1

    features = bundle.extract_features([path, env.images / "wide.PNG"])
    assert features.shape == (2, FEATURE_DIM) and features.dtype == np.float32
    np.testing.assert_allclose(bundle.extract_features(str(path)), features[0], rtol=1e-5)
    both = bundle.predict([Image.open(path)], mode="both")
    assert both[0]["classification"] == by_path[:5]
    with pytest.raises(ImageLoadError):
        bundle.classify(env.images / "b" / "broken.jpg")
    with pytest.raises(UserError, match="top-k"):
        bundle.classify(path, top_k=0)


def test_amp_runs_in_bfloat16_on_cpu(env):
    bundle = env.bundle
    amp_model = ArtistModel(bundle.model, bundle.transform, bundle.class_names, amp=True)
    path = env.images / "top.jpg"
    reference, features = bundle.extract_features(path), amp_model.extract_features(path)
    assert features.dtype == np.float32
    assert np.linalg.norm(features - reference) < 0.1 * np.linalg.norm(reference)


def test_model_folder_with_config_needs_only_checkpoint_and_input(tmp_path, monkeypatch):
    folder = tmp_path / "community_model"
    folder.mkdir()
    net = timm.create_model("lsnet_xl_artist", num_classes=2, feature_dim=8)
    # Half precision keeps the file small; loading copies into the float32 model.
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, folder / "best_checkpoint.pth")
    write_class_mapping(folder / "class_mapping.csv", ["x", "y"])
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_xl_artist", "input_size": SIZE}))
    image = gen.noise_image(tmp_path / "one.png", (64, 64))
    monkeypatch.chdir(tmp_path)
    run("--checkpoint", folder, "--input", image)
    result = json.loads((tmp_path / "output" / "one_result.json").read_text())
    assert result["model"] == "lsnet_xl_artist" and {c["class_name"] for c in result["classification"]} == {"x", "y"}


def test_model_folder_without_config_needs_model(tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    torch.save({"model": make_model().state_dict()}, folder / "best_checkpoint.pth")
    write_class_mapping(folder / "class_mapping.csv", CLASSES)
    with pytest.raises(UserError, match=r"config.json is missing.*pass --model \(the weights look like lsnet_t_artist"):
        load_model_bundle(folder)
    assert load_model_bundle(folder, "lsnet_t_artist", input_size=SIZE).class_names == CLASSES


def test_config_and_class_names_stored_by_training(tmp_path):
    """Training stores its config (a fine-tuned model is evaluated with a squash resize) and class names."""
    config = {"model": "lsnet_t_artist", "input_size": SIZE, "crop_pct": 1.0, "crop_mode": "squash"}
    torch.save({"model": make_model().state_dict(), "class_names": CLASSES, "config": config},
               tmp_path / "model_best.pth")
    write_class_mapping(tmp_path / "classes.csv", CLASSES)
    bundle = load_model_bundle(tmp_path / "model_best.pth", class_csv=tmp_path / "classes.csv")
    assert bundle.model_name == "lsnet_t_artist" and bundle.data_config["crop_mode"] == "squash"
    squash = transforms.Compose([
        transforms.Resize((SIZE, SIZE), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    assert_same_preprocessing(preprocess(bundle.transform, image), squash(image))

    write_class_mapping(tmp_path / "reordered.csv", CLASSES[::-1])
    with pytest.raises(UserError, match=r"reordered\.csv does not match the class names stored in model_best\.pth "
                                        r"\(id 0: 'Alice Artist' in the model_best\.pth, 'Chloé'"):
        load_model_bundle(tmp_path / "model_best.pth", class_csv=tmp_path / "reordered.csv")


def test_original_training_checkpoint(tmp_path):
    """A checkpoint of the original artist script: official key names, args as an argparse.Namespace."""
    reference = json.loads((REFERENCE_DIR / "lsnet_t_artist_fd256_c10.json").read_text())
    net = make_model(num_classes=10, feature_dim=256, seed=1)
    assert list(net.state_dict()) == list(reference["state_dict"])
    args = argparse.Namespace(model="lsnet_t_artist", input_size=SIZE, num_classes=10, feature_dim=256, lr=1e-3)
    torch.save({"model": net.state_dict(), "optimizer": {}, "epoch": 41, "args": args}, tmp_path / "ckpt.pth")
    classes = [f"artist_{i}" for i in range(10)]
    write_class_mapping(tmp_path / "classes.csv", classes)
    image = gen.noise_image(tmp_path / "img.png", (100, 80), seed=7)

    run("--model", "lsnet_t_artist", "--checkpoint", tmp_path / "ckpt.pth", "--class-csv", tmp_path / "classes.csv",
        "--input", image, "--output", tmp_path / "out", "--top-k", "10")
    result = json.loads((tmp_path / "out" / "img_result.json").read_text())

    direct = timm.create_model("lsnet_t_artist", num_classes=10, feature_dim=256)
    direct.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=False)["model"])
    transform, _ = build_eval_transform(direct.eval(), SIZE)
    _, probs = direct_outputs(direct, transform, [image])
    got = torch.zeros(10)
    for c in result["classification"]:
        got[c["class_id"]] = c["probability"]
    torch.testing.assert_close(got, probs[0], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- error paths


def diverged_checkpoint(path: Path, net: torch.nn.Module, **extra) -> Path:
    """The weights of a diverged run: finite but about 1e15 times too large, so the outputs are NaN."""
    state = {k: v * 1e15 if k.endswith(".weight") and v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"model": state, "args": {"model": "lsnet_t_artist", "input_size": SIZE}, **extra}, path)
    return path


def test_diverged_model_is_refused_before_writing(env, tmp_path):
    checkpoint = diverged_checkpoint(tmp_path / "diverged.pth", env.net)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"diverged\.pth gives NaN or infinite outputs on the first batch .*"
                                        r"use an earlier checkpoint"):
        run("--checkpoint", checkpoint, "--input", env.images, "--output", out, "--mode", "cluster")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_failed_write_keeps_the_previous_outputs(env, tmp_path):
    """A real failing write (the kernel refuses to grow a file past RLIMIT_FSIZE, as a full disk refuses to): one
    error line naming the file, and the folder keeps the previous run's complete set."""
    import resource

    folder = tmp_path / "wide"
    folder.mkdir()
    torch.save({"model": make_model(feature_dim=256).state_dict()}, folder / "model_best.pth")
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "input_size": SIZE}))
    out = tmp_path / "out"
    run("--checkpoint", env.run_dir, "--input", env.images, "--output", out, "--mode", "both")  # the previous run
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    limit = 2048  # batch_results.json without features fits, features.npy (5 x 256 float32) does not
    proc = subprocess.run(
        [sys.executable, "inference_artist.py", "--checkpoint", str(folder), "--input", str(env.images), "--output",
         str(out), "--mode", "cluster", "--no-json-features", "--device", "cpu", "--num-workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(rf"error: cannot write {re.escape(str(out / 'features.npy'))} \(File too large\); .*"
                        r"\(existing files there were left unchanged\)", proc.stderr.strip().splitlines()[-1])
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def assert_one_line_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(expected, lines[0]), lines[0]


@pytest.fixture(scope="module")
def error_cases(env):
    """Command lines of the error cases: a checkpoint without head/CSV agreement, a folder without config, ..."""
    tmp = env.tmp / "errors"
    tmp.mkdir()
    write_class_mapping(tmp / "five.csv", [f"c{i}" for i in range(5)])
    bare = tmp / "bare"
    bare.mkdir()
    torch.save({"model": env.net.state_dict()}, bare / "best_checkpoint.pth")
    write_class_mapping(bare / "class_mapping.csv", CLASSES)
    ckpt, image, out = env.run_dir / "model_best.pth", env.images / "top.jpg", tmp / "out"
    cases = {
        "classify_without_csv": ["--checkpoint", ckpt, "--input", image],
        "csv_head_mismatch": ["--checkpoint", ckpt, "--class-csv", tmp / "five.csv", "--input", image],
        "missing_checkpoint": ["--checkpoint", tmp / "missing.pth", "--input", image, "--mode", "cluster"],
        "wrong_model": ["--checkpoint", env.run_dir, "--model", "lsnet_s_artist", "--input", image],
        "feature_dim_mismatch": ["--checkpoint", env.run_dir, "--feature-dim", "32", "--input", image],
        "folder_without_config": ["--checkpoint", bare, "--input", image],
        "unreadable_image": ["--checkpoint", env.run_dir, "--input", env.images / "b" / "broken.jpg"],
    }
    return {case: [str(a) for a in [*argv, "--output", out]] for case, argv in cases.items()}


SUBPROCESS_ERRORS = {
    "classify_without_csv": r"class names .*--class-csv .*run/class_mapping\.csv",
    "csv_head_mismatch": r"class counts disagree: the checkpoint's head \(model_best\.pth\) has 3, .*five\.csv has 5",
    "missing_checkpoint": r"checkpoint not found: .*missing\.pth",
    "wrong_model": r"does not fit .*lsnet_s_artist.*look like lsnet_t_artist: pass --model lsnet_t_artist",
}


@pytest.fixture(scope="module")
def subprocess_errors(error_cases):
    """The acceptance error cases run as real subprocesses, all started at once (start-up dominates)."""
    procs = {
        case: subprocess.Popen([sys.executable, "inference_artist.py", *error_cases[case]], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case in SUBPROCESS_ERRORS
    }
    return {case: (proc.wait(timeout=300), proc.stderr.read()) for case, proc in procs.items()}


@pytest.mark.parametrize("case", list(SUBPROCESS_ERRORS))
def test_error_in_subprocess_is_one_line(subprocess_errors, case):
    assert_one_line_error(*subprocess_errors[case], SUBPROCESS_ERRORS[case])


@pytest.mark.parametrize(("case", "expected"), [
    ("feature_dim_mismatch", r"feature sizes disagree: .* has 16, --feature-dim has 32"),
    ("folder_without_config", r"config\.json is missing .*pass --model"),
    ("unreadable_image", r"cannot read .*broken\.jpg \(truncated"),
])
def test_error_is_one_line(error_cases, case, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run(*error_cases[case]))
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, expected)


def test_decoding_threads_give_the_serial_results(env):
    """On the CPU, num_workers > 0 decodes each batch with threads: same rows, names and skipped files, in order."""
    names = list_images(env.images)  # b/broken.jpg is the second of six
    paths = [env.images / name for name in names]
    serial = env.bundle.run_paths(paths, "both", names=names, batch_size=2, num_workers=0)
    threaded = env.bundle.run_paths(paths, "both", names=names, batch_size=2, num_workers=3)
    assert threaded.names == serial.names == [n for n in names if n != "b/broken.jpg"]
    assert threaded.skipped == serial.skipped and [s.path for s in serial.skipped] == ["b/broken.jpg"]
    np.testing.assert_array_equal(threaded.features, serial.features)
    assert threaded.classifications == serial.classifications


# ------------------------------------------------------------------------------------------- torch.compile


def test_compile_flag_matches_eager_and_compiles_once(env):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    outputs = {}
    for label, flags in (("compiled", ["--compile"]), ("eager", [])):
        out = env.tmp / f"out_{label}"
        run("--checkpoint", env.run_dir, "--input", env.images, "--output", out, "--mode", "both", "--batch-size",
            "3", "--num-workers", "0", *flags)  # batches of 2 (one file unreadable), 3 and 1 images
        outputs[label] = (np.load(out / "features.npy"), json.loads((out / "batch_results.json").read_text()))
    (features, report), (eager_features, eager_report) = outputs["compiled"], outputs["eager"]
    np.testing.assert_allclose(features, eager_features, rtol=1e-4, atol=1e-5)
    assert list(report["results"]) == list(eager_report["results"]) == READABLE
    for name, entry in report["results"].items():
        assert [c["class_id"] for c in entry["classification"]] == \
            [c["class_id"] for c in eager_report["results"][name]["classification"]]
    # smaller batches are padded to the compiled batch size instead of compiling the model again
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_failure_is_a_user_error():
    """A machine where Inductor cannot compile (here: no C++ compiler) gets one line at the first batch; the model
    is a small stand-in, since load_model_bundle(compile=True) wraps every model in the same PaddedCompiledModel
    (test_compile_flag_matches_eager_and_compiles_once), and compiling LSNet only to fail costs a minute."""
    import torch._inductor.config as inductor_config

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    # config.patch restores the settings afterwards (monkeypatch would delete them from the config module)
    with inductor_config.patch({"force_disable_caches": True, "cpp.cxx": ("no-such-c++-compiler",)}):
        torch._dynamo.reset()
        compiled = PaddedCompiledModel(net)
        with pytest.raises(UserError, match=r"torch.compile failed on this machine .*; run without --compile"):
            compiled(torch.randn(2, 3, 8, 8))
    torch._dynamo.reset()


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--input-size", "0", "must be at least 16, got 0"),
    ("--batch-size", "-1", "must be at least 1, got -1"),
    ("--top-k", "two", "must be an integer, got 'two'"),
    ("--threshold", "1.5", r"must be in \[0, 1\], got 1.5"),
    ("--num-workers", "-2", "must be at least 0, got -2"),
])
def test_numeric_flags_are_checked_at_parse_time(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--checkpoint", "x", "--input", "y", flag, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(rf"error: argument {flag}: {expected}$", last), last
