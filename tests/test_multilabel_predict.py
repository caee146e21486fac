"""predict_artist_multilabel.py: confidences, threshold, top-k, ratios, debug output, inputs, skipped files, errors."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import imagegen as gen
import pytest
import torch
from test_inference import diverged_checkpoint, make_model, preprocess
from test_outputs import FullDisk

import artifacts.atomic as atomic
from data import load_image, write_class_mapping
from predict_artist_multilabel import get_args_parser, main
from predictor import load_model_bundle
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Alice Artist", "Bob, the Painter", "Chloé", "d", "e", "f", "g", "h"]
SIZE = 32
TOP = ["top.jpg", "wide.PNG"]
NESTED = ["a/one.png", "a/sub/two.png"]


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in ["--device", "cpu", "--num-workers", "0", *argv]]))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A multi-label model folder, its unfused network, and an image folder with a sub-folder and a broken file."""
    tmp = tmp_path_factory.mktemp("predict")
    net = make_model(num_classes=len(LABELS), feature_dim=16)
    with torch.no_grad():
        net.head.l.weight.mul_(0.2)  # confidences spread over (0, 1)
    run_dir = tmp / "run"
    run_dir.mkdir()
    config = {"model": "lsnet_t_artist", "num_classes": len(LABELS), "feature_dim": 16, "input_size": SIZE,
              "multi_label": True}
    torch.save({"model": net.state_dict(), "class_names": LABELS, "config": config}, run_dir / "model_best.pth")
    write_class_mapping(run_dir / "class_mapping.csv", LABELS)
    (run_dir / "config.json").write_text(json.dumps(config))
    images = tmp / "images"
    gen.noise_image(images / "top.jpg", (80, 80), seed=1)
    gen.noise_image(images / "wide.PNG", (120, 50), seed=2)
    gen.noise_image(images / "a" / "one.png", (60, 60), seed=3)
    gen.noise_image(images / "a" / "sub" / "two.png", (70, 50), seed=4)
    gen.truncated_jpeg(images / "a" / "broken.jpg")
    gen.text_file(images / "notes.txt")
    transform = load_model_bundle(run_dir, device="cpu").transform
    names = [*NESTED, *TOP]
    with torch.no_grad():
        confidences = net(torch.stack([preprocess(transform, load_image(images / n)) for n in names])).sigmoid()
    expected = {f"{images.as_posix()}/{n}": row for n, row in zip(names, confidences, strict=True)}
    return tmp, run_dir, images, expected


def test_debug_full_matches_the_model_and_skips_unreadable_files(env, capsys):
    tmp, run_dir, images, expected = env
    record = run("--checkpoint", run_dir, "--inputs", images, "--output", tmp / "full.json", "--debug-full",
                 "--top-k", "100", "--threshold", "0", "--batch-size", "2")
    assert json.loads((tmp / "full.json").read_text(encoding="utf-8")) == record
    assert record["num_images"] == 4 and record["model"] == "lsnet_t_artist" and record["input_size"] == SIZE
    assert set(record["results"]) == set(expected)
    assert [item["path"] for item in record["skipped"]] == [f"{images.as_posix()}/a/broken.jpg"]
    assert record["skipped"][0]["reason"].startswith("truncated")
    for name, entry in record["results"].items():
        assert list(entry["all_confidences"]) == LABELS
        torch.testing.assert_close(torch.tensor(list(entry["all_confidences"].values())), expected[name],
                                   rtol=1e-4, atol=1e-5)
        confidences = [e["confidence"] for e in entry["labels"]]
        assert len(confidences) == len(LABELS) and confidences == sorted(confidences, reverse=True)
        assert all(set(e) == {"label", "confidence"} for e in entry["labels"])
    assert "warning: skipping" in capsys.readouterr().err


def test_inference_api_gives_a_multilabel_model_sigmoid_confidences(env):
    tmp, run_dir, images, expected = env
    bundle = load_model_bundle(run_dir, device="cpu")
    entries = bundle.classify(images / "top.jpg", top_k=len(LABELS))
    by_name = {e["class_name"]: e["probability"] for e in entries}
    torch.testing.assert_close(torch.tensor([by_name[label] for label in LABELS]),
                               expected[f"{images.as_posix()}/top.jpg"], rtol=1e-4, atol=1e-5)
    assert abs(sum(by_name.values()) - 1) > 1e-3  # not a softmax


def test_threshold_top_k_and_ratio(env):
    tmp, run_dir, images, expected = env
    all_confidences = torch.stack(list(expected.values()))
    threshold = all_confidences.median().item()
    record = run("--checkpoint", run_dir, "--inputs", images, "--output", tmp / "kept.json", "--top-k", "2",
                 "--threshold", threshold, "--normalize-ratio")
    kept_any = False
    for name, entry in record["results"].items():
        assert "all_confidences" not in entry
        values, indices = expected[name].topk(2)
        wanted = [LABELS[i] for v, i in zip(values.tolist(), indices.tolist(), strict=True) if v >= threshold]
        assert [e["label"] for e in entry["labels"]] == wanted
        assert all(e["confidence"] >= threshold for e in entry["labels"])
        if entry["labels"]:
            kept_any = True
            assert sum(e["ratio"] for e in entry["labels"]) == pytest.approx(1.0)
            total = sum(e["confidence"] for e in entry["labels"])
            assert all(e["ratio"] == pytest.approx(e["confidence"] / total) for e in entry["labels"])
    assert kept_any
    nothing = run("--checkpoint", run_dir, "--inputs", images / "top.jpg", "--output", tmp / "none.json",
                  "--threshold", "1", "--normalize-ratio")
    assert nothing["results"][f"{images.as_posix()}/top.jpg"]["labels"] == []


def test_inputs_files_and_folders_recursive_or_not(env, capsys):
    tmp, run_dir, images, _ = env
    root = images.as_posix()
    record = run("--checkpoint", run_dir, "--inputs", images / "top.jpg", images / "a", images, "--no-recursive",
                 "--output", tmp / "flat.json")
    # Given order, each image once; the folder a/ is listed without its sub-folder.
    assert list(record["results"]) == [f"{root}/top.jpg", f"{root}/a/one.png", f"{root}/wide.PNG"]
    record = run("--checkpoint", run_dir, "--inputs", images / "a", "--output", tmp / "deep.json")
    assert list(record["results"]) == [f"{root}/a/one.png", f"{root}/a/sub/two.png"]
    assert record["num_skipped"] == 1

    capsys.readouterr()
    record = run("--checkpoint", run_dir / "model_best.pth", "--class-mapping", run_dir / "class_mapping.csv",
                 "--inputs", images / "wide.PNG", "--output", tmp / "nested" / "one.json", "--normalize-ratio")
    label = record["results"][f"{root}/wide.PNG"]["labels"][0]["label"]
    assert f"{root}/wide.PNG: {label} " in capsys.readouterr().out
    assert (tmp / "nested" / "one.json").is_file()


def test_single_label_model_gets_a_warning(env, capsys):
    tmp, run_dir, images, _ = env
    net = make_model(num_classes=len(LABELS), feature_dim=16)
    torch.save({"model": net.state_dict(), "args": {"model": "lsnet_t_artist"}}, tmp / "single.pth")
    run("--checkpoint", tmp / "single.pth", "--class-mapping", run_dir / "class_mapping.csv", "--inputs",
        images / "top.jpg", "--output", tmp / "single.json")
    assert "does not come from train_artist_multilabel.py" in capsys.readouterr().err


def test_diverged_model_is_refused(env):
    tmp, run_dir, images, _ = env
    checkpoint = diverged_checkpoint(tmp / "diverged.pth", make_model(num_classes=len(LABELS), feature_dim=16))
    with pytest.raises(UserError, match=r"diverged\.pth gives NaN or infinite outputs on the first batch"):
        run("--checkpoint", checkpoint, "--class-mapping", run_dir / "class_mapping.csv", "--inputs", images,
            "--output", tmp / "diverged.json")
    assert not (tmp / "diverged.json").exists()


def test_failed_write_keeps_the_previous_file(env, monkeypatch):
    """A full disk while writing the predictions: one-line error naming the file, the previous file intact."""
    tmp, run_dir, images, _ = env
    output = tmp / "rewritten.json"
    run("--checkpoint", run_dir, "--inputs", images / "top.jpg", "--output", output)
    before = output.read_bytes()
    FullDisk.budget = 100
    monkeypatch.setattr(atomic, "_create_temp", lambda path: io.BufferedWriter(FullDisk(path, "x")))
    with pytest.raises(UserError, match=rf"cannot write {re.escape(str(output))} \(No space left on device\)"):
        run("--checkpoint", run_dir, "--inputs", images, "--output", output)
    assert output.read_bytes() == before
    assert not [path for path in tmp.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("case, message", [
    ("mapping_size", r"class counts disagree: the checkpoint's head \(model_best.pth\) has 8, .*five.csv has 5"),
    ("no_mapping", r"the label names of .*bare.pth are unknown; pass --class-mapping"),
    ("missing_input", r"input not found: .*nothing.jpg"),
    ("no_images", r"no image files in the --inputs"),
    ("threshold", r"--threshold is a confidence between 0 and 1, got 1.5"),
])
def test_clear_errors(env, case, message):
    tmp, run_dir, images, _ = env
    argv = ["--checkpoint", run_dir, "--inputs", images, "--output", tmp / f"{case}.json"]
    if case == "mapping_size":
        write_class_mapping(tmp / "five.csv", LABELS[:5])
        argv += ["--class-mapping", tmp / "five.csv"]
    elif case == "no_mapping":
        torch.save({"model": make_model(num_classes=len(LABELS), feature_dim=16).state_dict()}, tmp / "bare.pth")
        argv += ["--checkpoint", tmp / "bare.pth", "--model", "lsnet_t_artist"]
    elif case == "missing_input":
        argv += ["--inputs", tmp / "nothing.jpg"]
    elif case == "no_images":
        (tmp / "empty").mkdir(exist_ok=True)
        argv += ["--inputs", tmp / "empty"]
    elif case == "threshold":
        argv += ["--threshold", "1.5"]
    else:
        argv += ["--top-k", "0"]
    with pytest.raises(UserError, match=message):
        run(*argv)
    assert not (tmp / f"{case}.json").exists()


def test_command_line_error_is_one_line(env):
    tmp, run_dir, _, _ = env
    result = subprocess.run([sys.executable, str(ROOT / "predict_artist_multilabel.py"), "--checkpoint", str(run_dir),
                             "--inputs", str(tmp / "nothing.jpg")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: input not found: {tmp / 'nothing.jpg'}; pass image files and/or directories of images"]


def test_numeric_flags_are_checked_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--checkpoint", "x", "--inputs", "y", "--top-k", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("argument --top-k: must be at least 1, got 0")
