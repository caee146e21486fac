"""Deployment: ONNX export verified with onnxruntime, the torch-free ONNX inference path, safetensors, Hub folders."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imagegen as gen
import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from test_inference import make_model

import export
import inference_artist
import predict_artist_multilabel
import serve
from artifacts.checkpoint import load_checkpoint
from artifacts.config_file import ONNX_FILE, REFERENCE_FILE, SAFETENSORS_FILE
from artifacts.model_folder import read_model_spec
from data import write_class_mapping
from deploy.export_onnx import read_reference
from inference.onnx_model import OnnxModel
from predictor import load_model_bundle
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).parent / "reference"
CLASSES = ["alice", "bob", "carol", "dave", "erin", "frank"]
SIZE = 64
STANDARD_DOMAINS = {"", "ai.onnx"}

# Imports torch/timm/torchvision fail in the subprocess: proves the ONNX path needs only numpy, Pillow, onnxruntime.
BLOCKER = '''import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Block())
'''


def save_folder(folder: Path, net: torch.nn.Module, name: str, **config) -> Path:
    folder.mkdir(parents=True)
    torch.save({"model": net.state_dict()}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", CLASSES[:net.num_classes])
    (folder / "config.json").write_text(json.dumps({"model": name, "input_size": SIZE, **config}))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An original-fork checkpoint of a projection model (``module.`` prefixes, argparse.Namespace arguments, the
    key layout of tests/reference) exported to ONNX and safetensors, and an image folder with a broken file."""
    tmp = tmp_path_factory.mktemp("deploy")
    net = make_model("lsnet_t_artist", num_classes=len(CLASSES), feature_dim=24)
    reference = json.loads((REFERENCE_DIR / "lsnet_t_artist_fd256_c10.json").read_text())
    assert list(net.state_dict()) == list(reference["state_dict"])
    source = tmp / "source"
    source.mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()},
                "args": argparse.Namespace(model="lsnet_t_artist", input_size=SIZE)}, source / "best_checkpoint.pth")
    write_class_mapping(source / "class_mapping.csv", CLASSES)
    images = tmp / "images"
    for i in range(5):
        gen.noise_image(images / f"img{i}.png", (70 + 10 * i, 90 - 5 * i), seed=i)
    gen.truncated_jpeg(images / "broken.jpg")
    exported = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(source), "--output-dir", str(tmp / "exported"), "--format", "both", "--int8",
         "--calibration-dir", str(images)]))
    return tmp, net, source, exported, images


def test_export_writes_a_standard_verified_folder(env):
    _, _, _, exported, _ = env
    graph = onnx.load(str(exported / ONNX_FILE))
    onnx.checker.check_model(graph)
    assert {node.domain for node in graph.graph.node} <= STANDARD_DOMAINS  # no custom SKA operator
    assert [o.name for o in graph.graph.output] == ["logits", "features", "texture"]
    config = json.loads((exported / "config.json").read_text())
    assert config["model"] == "lsnet_t_artist" and config["feature_dim"] == 24 and config["input_size"] == SIZE
    assert config["onnx"]["opset"] == 18 and config["format"] == "onnx+safetensors"
    inputs, outputs = read_reference(exported / REFERENCE_FILE)
    session = onnxruntime.InferenceSession(str(exported / ONNX_FILE), providers=["CPUExecutionProvider"])
    logits, features, texture = session.run(None, {"input": inputs})
    np.testing.assert_allclose(logits, outputs["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(texture, outputs["texture"], rtol=1e-5, atol=1e-5)
    assert features.shape == (2, 24) and texture.shape == (2, 64 + 128 + 256)


def test_int8_folder_is_quantized_and_runs(env):
    _, _, _, exported, images = env
    graph = onnx.load(str(exported / "int8" / ONNX_FILE))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.graph.node}
    result = load_model_bundle(exported / "int8").run_directory(images)
    assert len(result.names) == 5 and all(c[0]["class_name"] in CLASSES for c in result.classifications)


def test_onnx_matches_pytorch_at_two_batch_sizes(env):
    _, net, _, exported, _ = env
    session = onnxruntime.InferenceSession(str(exported / ONNX_FILE), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        logits, features, texture = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want_features, want_logits = net(x, return_both=True)
            want_texture = net.forward_texture(x).numpy()
        assert np.abs(logits - want_logits.numpy()).max() <= 1e-4 * np.abs(want_logits.numpy()).max()
        assert np.abs(features - want_features.numpy()).max() <= 1e-4 * np.abs(want_features.numpy()).max()
        assert np.abs(texture - want_texture).max() <= 1e-4 * np.abs(want_texture).max()


def test_exported_folder_classifies_like_pytorch(env, tmp_path):
    tmp, _, source, exported, images = env
    onnx_model, torch_model = load_model_bundle(exported), load_model_bundle(source, device="cpu")
    assert isinstance(onnx_model, OnnxModel)
    ours, theirs = onnx_model.run_directory(images, "both"), torch_model.run_directory(images, "both")
    assert ours.names == theirs.names and [s.path for s in ours.skipped] == ["broken.jpg"]
    assert [c[0]["class_id"] for c in ours.classifications] == [c[0]["class_id"] for c in theirs.classifications]
    np.testing.assert_allclose(ours.features, theirs.features, rtol=1e-3, atol=1e-3)
    one = onnx_model.classify(images / "img0.png", top_k=3)
    assert len(one) == 3 and one[0]["class_name"] in CLASSES
    assert onnx_model.extract_features([images / "img1.png"] * 2).shape == (2, 24)
    # The script writes the same files as the PyTorch path.
    inference_artist.main(inference_artist.get_args_parser().parse_args(
        ["--checkpoint", str(exported), "--input", str(images), "--mode", "both", "--output", str(tmp_path / "out")]))
    batch = json.loads((tmp_path / "out" / "batch_results.json").read_text())
    assert batch["skipped"][0]["path"] == "broken.jpg"
    assert np.load(tmp_path / "out" / "features.npy").shape == (5, 24)
    assert batch["style_vector"] == {"descriptor": "pooled", "normalized": False}
    # Texture style vectors come from the graph's third output, as PyTorch computes them.
    onnx_model.use_descriptor("texture")
    torch_model.use_descriptor("texture")
    assert onnx_model.feature_dim == torch_model.feature_dim == 448
    np.testing.assert_allclose(onnx_model.extract_features([images / "img1.png"]),
                               torch_model.extract_features([images / "img1.png"]), atol=1e-4)
    # An export from before texture vectors (no third output) gives pooled vectors only, and says so in one line.
    old = tmp_path / "old_export"
    shutil.copytree(exported, old, ignore=shutil.ignore_patterns("int8"))
    graph = onnx.load(str(old / ONNX_FILE))
    graph.graph.output.pop()
    onnx.save(graph, str(old / ONNX_FILE))
    old_model = load_model_bundle(old)
    assert old_model.descriptors == ("pooled",) and old_model.feature_dim == 24
    with pytest.raises(UserError, match="computes only pooled style vectors"):
        old_model.use_descriptor("texture")


def test_onnx_path_runs_without_torch(env, tmp_path):
    _, _, _, exported, images = env
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    code = ("import json, sys\nfrom inference.onnx_model import load_onnx_model\n"
            f"m = load_onnx_model({str(exported)!r})\n"
            f"r = m.run_directory({str(images)!r}, 'both')\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
            "print(json.dumps([r.names, r.classifications[0][0]['class_name'], len(r.skipped)]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert result.returncode == 0, result.stderr
    names, top1, skipped = json.loads(result.stdout)
    assert len(names) == 5 and top1 in CLASSES and skipped == 1
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the blocker works


def test_safetensors_folder_round_trip(env):
    _, net, _, exported, images = env
    spec = read_model_spec(exported / SAFETENSORS_FILE, exported / "class_mapping.csv", model_name="lsnet_t_artist")
    rebuilt = spec.build().eval()
    for key, value in net.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # --finetune-from's loader takes the folder too
    fresh = make_model("lsnet_t_artist", num_classes=len(CLASSES), feature_dim=24, seed=5)
    load_checkpoint(exported, fresh)
    assert torch.equal(fresh.head.l.weight, net.head.l.weight)


@pytest.mark.slow
def test_dynamic_size_multilabel_and_plain_lsnet_t(tmp_path):
    """A multi-label lsnet_t folder exported with dynamic size runs at two input sizes and keeps its sigmoid."""
    torch.manual_seed(3)
    net = timm.create_model("lsnet_t", num_classes=4).eval()  # official LSNet layout, no projection
    source = save_folder(tmp_path / "ml", net, "lsnet_t_artist", multi_label=True)
    out = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(source), "--output-dir", str(tmp_path / "ml_onnx"), "--dynamic-size"]))
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    for size, batch in ((SIZE, 2), (SIZE + 64, 3)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        logits, _, _ = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = net(x).numpy()
        assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max(), size
    config = json.loads((out / "config.json").read_text())
    assert config["multi_label"] is True and config["onnx"]["dynamic_size"] is True
    model = load_model_bundle(out, input_size=SIZE + 32)
    probs = model.predict(probe_image(tmp_path), top_k=4)["classification"]
    assert len(probs) == 4
    assert abs(sum(p["probability"] for p in probs) - 1.0) > 1e-3  # independent sigmoids, not a softmax
    # predict_artist_multilabel.py gives the same labels from the exported folder as from the PyTorch one
    records = [predict_artist_multilabel.main(predict_artist_multilabel.get_args_parser().parse_args(
        ["--checkpoint", str(folder), "--inputs", str(tmp_path / "probe.png"), "--threshold", "0",
         "--output", str(tmp_path / f"{folder.name}.json"), "--debug-full"])) for folder in (source, out)]
    theirs, ours = (next(iter(record["results"].values())) for record in records)
    assert [e["label"] for e in ours["labels"]] == [e["label"] for e in theirs["labels"]]
    np.testing.assert_allclose(list(ours["all_confidences"].values()), list(theirs["all_confidences"].values()),
                               atol=1e-4)


def probe_image(tmp_path: Path) -> Path:
    return gen.noise_image(tmp_path / "probe.png", (80, 96), seed=9)


def test_hub_folder_offline_from_cache(env, tmp_path, monkeypatch):
    """hf-hub:OWNER/REPO resolves to a pre-filled huggingface_hub cache when offline; a repo that is not cached is a
    one-line error. Nothing is downloaded."""
    _, _, _, exported, images = env
    repo = tmp_path / "hub" / "models--artists--lsnet-demo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in (ONNX_FILE, "config.json", "class_mapping.csv"):
        (repo / "snapshots" / commit / name).write_bytes((exported / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model_bundle("hf-hub:artists/lsnet-demo")
    assert isinstance(model, OnnxModel) and model.classify(images / "img0.png")[0]["class_name"] in CLASSES
    with pytest.raises(UserError, match="not in the Hugging Face cache") as err:
        load_model_bundle("hf-hub:artists/absent@v1")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a Hub model id"):
        load_model_bundle("hf-hub:no-owner")


@pytest.mark.parametrize("case", ["missing", "unknown_architecture", "unwritable"])
def test_bad_inputs_are_one_line_errors(env, tmp_path, case):
    _, _, source, _, _ = env
    output = tmp_path / "out"
    checkpoint = str(tmp_path / "nowhere")
    expected = "checkpoint not found"
    if case == "unknown_architecture":
        torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, tmp_path / "odd.pth")
        checkpoint, expected = str(tmp_path / "odd.pth"), "does not record its architecture"
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("a file, not a folder")
        checkpoint, output, expected = str(source), blocker / "out", "cannot create"
    with pytest.raises(UserError, match=expected) as err:
        export.main(export.get_args_parser().parse_args(["--checkpoint", checkpoint, "--output-dir", str(output)]))
    assert "\n" not in str(err.value)


# The optional packages each script names in its one-line error; everything else must work without them.
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "faiss", "fastapi", "uvicorn")
# A None entry in sys.modules is how Python spells "not installed" to both `import` and importlib.util.find_spec.
WITHOUT_OPTIONAL = f'''import contextlib, io, json, sys
sys.modules.update(dict.fromkeys({OPTIONAL!r}))
import export, inference_artist, serve
from utils import run_cli
def run(script, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_cli(lambda: script.main(script.get_args_parser().parse_args(argv)))
            code = 0
        except SystemExit as stop:
            code = stop.code
    return [code, err.getvalue()]
'''


def test_core_scripts_run_without_optional_packages_and_name_the_missing_ones(env, tmp_path):
    """Base requirements only: inference and a safetensors export work; ONNX export, ONNX folders, --gallery and
    serve.py stop with one line naming the requirements file, before writing anything."""
    _, _, source, exported, images = env
    cases = {"inference": (inference_artist, ["--checkpoint", str(source), "--input", str(images),
                                              "--output", str(tmp_path / "pred"), "--device", "cpu"]),
             "safetensors": (export, ["--checkpoint", str(source), "--output-dir", str(tmp_path / "st"),
                                      "--format", "safetensors"]),
             "onnx_export": (export, ["--checkpoint", str(source), "--output-dir", str(tmp_path / "onnx")]),
             "onnx_folder": (inference_artist, ["--checkpoint", str(exported), "--input", str(images),
                                                "--output", str(tmp_path / "onnx_pred")]),
             "gallery": (inference_artist, ["--checkpoint", str(source), "--input", str(images), "--device", "cpu",
                                            "--gallery", str(tmp_path), "--output", str(tmp_path / "gal_pred")]),
             "serve": (serve, ["--checkpoint", str(source), "--port", "0", "--device", "cpu"])}
    code = WITHOUT_OPTIONAL + "print(json.dumps({" + ", ".join(
        f"{name!r}: run({module.__name__}, {argv!r})" for name, (module, argv) in cases.items()) + "}))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["inference"][0] == 0 and (tmp_path / "pred" / "batch_results.json").is_file()
    assert outcome["safetensors"][0] == 0 and (tmp_path / "st" / SAFETENSORS_FILE).is_file()
    for name, requirements in (("onnx_export", "requirements-deploy.txt"), ("onnx_folder", "requirements-deploy.txt"),
                               ("gallery", "requirements-retrieval.txt"), ("serve", "requirements-serve.txt")):
        code, stderr = outcome[name]
        assert code == 2 and stderr.count("\n") == 1 and requirements in stderr, (name, stderr)
    assert not (tmp_path / "onnx").exists()  # checked before the export folder is made
    assert not any((tmp_path / "onnx_pred").iterdir()) and not any((tmp_path / "gal_pred").iterdir())
