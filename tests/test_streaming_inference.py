"""Streaming directory runs: inference_artist.py writes results as they are computed into a work folder, assembles
the usual outputs from it (byte for byte those of the in-memory writers), and an interrupted run continued with
--resume gives the outputs of an uninterrupted one; tools/build_gallery.py's embedding streams and resumes too."""

import json
import shutil

import imagegen as gen
import numpy as np
import pytest
from test_inference import write_model_folder

import artifacts.outputs as outputs_module
import artifacts.work_folder as work_folder
import inference_artist
import retrieval.references as references
from artifacts.atomic import OutputSet
from artifacts.outputs import (
    BATCH_RESULTS_FILE,
    FEATURES_FILE,
    GALLERY_RESULTS_FILE,
    NAMES_FILE,
    write_batch_results,
    write_features,
)
from artifacts.work_folder import PROGRESS_FILE, Part, WorkFolder, work_folder_for
from inference.results import BatchedModel
from predictor import load_model_bundle
from tools import build_gallery as tool_build_gallery
from utils import UserError

BROKEN = ("img02.jpg", "img07.jpg")  # unreadable: one before the first interruption, one after
OUTPUTS = (BATCH_RESULTS_FILE, FEATURES_FILE, NAMES_FILE, GALLERY_RESULTS_FILE)
STREAM_PATHS = BatchedModel.stream_paths


def build_gallery(*argv):
    args = [str(a) for a in argv] + ["--device", "cpu", "--num-workers", "0"]
    return tool_build_gallery.main(tool_build_gallery.get_args_parser().parse_args(args))


@pytest.fixture(scope="module", autouse=True)
def load_once():
    """Each checkpoint loaded once for the module's many short runs (loading is not what is tested here)."""
    cache = {}

    def load(checkpoint, *args, **kwargs):
        key = (str(checkpoint), args, tuple(sorted(kwargs)))
        if key not in cache:
            cache[key] = load_model_bundle(checkpoint, *args, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference_artist, "load_model_bundle", load)
        patch.setattr(tool_build_gallery, "load_model_bundle", load)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model folder, 10 images (2 unreadable), a 2-artist gallery and the outputs of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("streaming")
    run_dir = write_model_folder(tmp / "run")
    images = tmp / "images"
    for i in range(10):
        name = f"img{i:02d}.{'jpg' if f'img{i:02d}.jpg' in BROKEN else 'png'}"
        if name in BROKEN:
            gen.truncated_jpeg(images / name)
        else:
            gen.noise_image(images / name, (64, 48 + i), seed=i)
    for artist in ("x", "y"):
        for i in range(2):
            gen.noise_image(tmp / "refs" / artist / f"{i}.png", (64, 64), seed=100 + 10 * len(artist) + i)
    build_gallery("--checkpoint", run_dir, "--images", tmp / "refs", "--output-dir", tmp / "gallery",
                  "--batch-size", "3")
    world = {"tmp": tmp, "run": run_dir, "images": images, "gallery": tmp / "gallery"}
    inference(world, tmp / "single")
    return world


def inference(world, out, *flags, checkpoint=None):
    return inference_artist.main(inference_artist.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint or world["run"]), "--input", str(world["images"]), "--output", str(out),
         "--mode", "both", "--gallery", str(world["gallery"]), "--batch-size", "2", "--top-k", "2", "--device", "cpu",
         "--num-workers", "0", *map(str, flags)]))


def outputs(folder):
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def interrupt_after(monkeypatch, batches):
    """Ctrl-C after ``batches`` batches of the next run."""
    def stream(self, *args, **kwargs):
        for i, batch in enumerate(STREAM_PATHS(self, *args, **kwargs)):
            if i == batches:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(BatchedModel, "stream_paths", stream)


def test_streamed_outputs_equal_the_in_memory_writers(world):
    """The assembled files are those the in-memory writers (the code before streaming) make of a whole run."""
    from retrieval.gallery import load_gallery

    single = world["tmp"] / "single"
    assert not work_folder_for(single).exists()  # removed once the outputs are written
    bundle = load_model_bundle(world["run"], device="cpu")
    gallery = load_gallery(world["gallery"])
    bundle.use_descriptor(gallery.descriptor)
    result = bundle.run_directory(world["images"], "both", batch_size=2, top_k=2)
    assert [s.path for s in result.skipped] == list(BROKEN)
    reference = world["tmp"] / "in_memory"
    reference.mkdir()
    metadata = inference_artist._metadata(bundle, "both", world["images"])
    with OutputSet(reference) as out:
        write_batch_results(out, metadata, result.entries(), len(result.names), [vars(s) for s in result.skipped])
        write_features(out, result.names, result.features)
    for name in (BATCH_RESULTS_FILE, FEATURES_FILE, NAMES_FILE):
        assert (single / name).read_bytes() == (reference / name).read_bytes(), name
    report = {"gallery": str(world["gallery"]), "metric": "cosine", "normalized": True, **gallery.thresholds(),
              "results": dict(zip(result.names, gallery.match(result.features, 2), strict=True))}
    text = (single / GALLERY_RESULTS_FILE).read_text(encoding="utf-8")
    streamed = json.loads(text)
    assert text == json.dumps(streamed, indent=2, ensure_ascii=False) + "\n"  # the layout of the old writer
    assert {k: v for k, v in streamed.items() if k != "results"} == \
        json.loads(json.dumps({k: v for k, v in report.items() if k != "results"}))
    for name, entry in report["results"].items():
        got = streamed["results"][name]
        scores = [a["score"] for a in entry["artists"]]
        np.testing.assert_allclose([a["score"] for a in got["artists"]], scores, rtol=1e-6)
        # Batches of another size may order artists whose scores tie to float32 rounding the other way round.
        ties = {a["artist"]: round(a["score"], 5) for a in entry["artists"]}
        assert [ties[a["artist"]] for a in got["artists"]] == [round(s, 5) for s in scores], name


def test_interrupted_runs_resume_to_the_same_bytes(world, monkeypatch, capsys):
    """Ctrl-C after a batch, a resumed run killed with two batches appended but not committed and a torn record
    behind them, then a last --resume: the outputs of one uninterrupted run, skipped files included."""
    out = world["tmp"] / "resumed"
    work = work_folder_for(out)
    monkeypatch.setattr(work_folder, "COMMIT_SECONDS", 0.0)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        inference(world, out)
    assert "interrupted with 2 of 10 images done: the same command with --resume continues" in capsys.readouterr().err
    part = work / "part-00000"
    committed = (part / PROGRESS_FILE).read_bytes()
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        inference(world, out, "--resume")
    assert json.loads((part / PROGRESS_FILE).read_text())["done"] == 6
    (part / PROGRESS_FILE).write_bytes(committed)  # killed before those batches were committed ...
    for name in ("features.f32", "results.jsonl", "gallery.jsonl"):
        with open(part / name, "ab") as f:
            f.write(b'{"torn": [0.1, 0.')  # ... in the middle of writing the next one
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"holds an interrupted run \(2 of 10 images done\); add --resume"):
        inference(world, out)
    with monkeypatch.context() as patch:  # a disk too small for the outputs: said before writing any
        patch.setattr(outputs_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
        with pytest.raises(UserError, match=r"the outputs need about 0.00 GiB in .*, which has 0.00 GiB free; free "
                                            r"some space, then run the same command with --resume"):
            inference(world, out, "--resume")
    assert not out.exists() or not any(out.iterdir())
    inference(world, out, "--resume")
    assert "resuming: 2 of 10 images done" in capsys.readouterr().out
    assert outputs(out) == outputs(world["tmp"] / "single")
    assert not work.exists()


def test_resume_refusals_are_one_line(world, monkeypatch):
    out = world["tmp"] / "refused"
    with pytest.raises(UserError) as info:
        inference(world, out, "--resume")
    assert str(info.value).startswith("--resume: no interrupted run to continue") and "\n" not in str(info.value)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        inference(world, out)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"started with another --top-k \(2 then, 3 now\); continue it with the "
                                        r"original command, or delete it"):
        inference(world, out, "--resume", "--top-k", "3")
    gen.noise_image(world["images"] / "late.png", (64, 64))
    try:
        with pytest.raises(UserError, match=r"another image list \(\"10 images, .*11 images"):
            inference(world, out, "--resume")
    finally:
        (world["images"] / "late.png").unlink()
    other = world["tmp"] / "other_run"
    shutil.copytree(world["run"], other)  # the same weights elsewhere (so the gallery accepts them)
    with pytest.raises(UserError, match=r"another checkpoint \(\{\"path\": .*run.*other_run") as info:
        inference(world, out, "--resume", checkpoint=other)
    assert "\n" not in str(info.value)


def test_gallery_embedding_streams_and_resumes(world, monkeypatch):
    """build_gallery.py interrupted while embedding, continued with --resume: the gallery of an uninterrupted run."""
    from retrieval.gallery import load_gallery

    gallery = world["tmp"] / "gallery_resumed"
    flags = ("--checkpoint", world["run"], "--images", world["tmp"] / "refs", "--output-dir", gallery,
             "--batch-size", "3")
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_gallery(*flags)
    monkeypatch.undo()
    assert json.loads((work_folder_for(gallery) / "images" / "part-00000" / PROGRESS_FILE).read_text())["done"] == 3
    with monkeypatch.context() as patch:  # the vectors' memory is checked before they are computed
        patch.setattr(references, "available_memory", lambda: 1000)
        with pytest.raises(UserError, match=r"the 448-value style vectors of 4 images in .*refs need 0.0 GiB of "
                                            r"memory, 0.0 GiB is available; embed fewer images at once"):
            build_gallery(*flags, "--resume")
    build_gallery(*flags, "--resume")
    resumed, single = load_gallery(gallery), load_gallery(world["gallery"])
    assert resumed.vectors.tobytes() == single.vectors.tobytes() and resumed.artists == single.artists
    assert not work_folder_for(gallery).exists()


# ------------------------------------------------------------------------------------------- the work folder


def test_torn_records_are_cut_and_short_files_refused(tmp_path):
    folder = WorkFolder.start(tmp_path / "w", {"a": 1}, 4, resume=False)
    with folder.parts[0].writer(("x.bin", "y.txt")) as writer:
        writer.append(2, 2, {"x.bin": b"\x01" * 8, "y.txt": b"one\ntwo\n"})
    (folder.parts[0].folder / "y.txt").open("ab").write(b"thr")  # torn
    part = Part(folder.parts[0].folder, 0, 4)
    assert list(part.lines("y.txt")) == ["one", "two"]
    with part.writer(("x.bin", "y.txt")) as writer:
        writer.append(2, 1, {"x.bin": b"\x02" * 4, "y.txt": b"three\n"})
    assert (part.folder / "y.txt").read_bytes() == b"one\ntwo\nthree\n"
    assert b"".join(part.chunks("x.bin", 5)) == b"\x01" * 8 + b"\x02" * 4 and part.complete
    (part.folder / "x.bin").write_bytes(b"\x01")
    with pytest.raises(UserError, match=r"is damaged \(x.bin is shorter than its progress record\); delete it"):
        part.writer(("x.bin",))
    with pytest.raises(UserError, match=r"--resume: .* was started with another a \(1 then, 2 now\)"):
        WorkFolder.start(tmp_path / "w", {"a": 2}, 4, resume=True)
