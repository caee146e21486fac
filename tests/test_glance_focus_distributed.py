"""train_glance_focus.py under torchrun: two processes (gloo, CPU) train the three stages on a tiny texture world.

Gradients are accumulated over 2 steps (the first without the all-reduce). Each stage checkpoint records every
process's parameter digest: they must agree (DistributedDataParallel), match the weights the main process saved and
differ from stage to stage. The model folder loads for inference, and stages written by two processes resume in one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_glance_focus
from artifacts.checkpoint import load_checkpoint_file
from artifacts.glance_focus_folder import create_model
from gfnet.stages import parameter_digest
from predictor import load_model_bundle
from tools.make_texture_world import make_texture_world

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
GF = ["--glance-size", "32", "--patch-size", "32", "--focus-resolution", "64", "--focus-steps", "2"]


def test_torchrun_trains_every_stage_with_identical_weights_then_resumes_on_one_process(tmp_path):
    classes = make_texture_world(tmp_path / "world", artists=3, train=4, val=1, size=(64, 64), amplitude=28,
                                 everywhere=True)
    out = tmp_path / "gf"
    flags = ["--data-path", str(tmp_path / "world"), "--output-dir", str(out), *GF, "--batch-size", "2",
             "--accumulation-steps", "2", "--workers", "0", "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train_glance_focus.py"), *flags, "--epochs", "1"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "distributed: 2 processes, backend gloo" in result.stdout
    for stage in (1, 2, 3):  # 12 images in batches of 2 over 2 processes: 3 steps each; only rank 0 prints
        assert result.stdout.count(f"stage {stage} epoch 1/1 [3/3]") == 1
    model = create_model("lsnet_t_gf", len(classes), glance_size=32, patch_size=32, focus_resolution=64,
                         focus_steps=2)
    digests = []
    for stage in (1, 2, 3):
        state = load_checkpoint_file(out / f"stage{stage}.pth")
        model.load_state_dict(state["model"])
        assert state["record"]["process_digests"] == [parameter_digest(model)] * 2
        digests.append(parameter_digest(model))
    assert len(set(digests)) == 3  # every stage changed the weights

    bundle = load_model_bundle(out)
    prediction = bundle.predict(next((tmp_path / "world" / "val").glob("*/0000.png")), "classify")
    assert len(prediction["classification"]) == 3 and prediction["glance_focus"]["steps"] == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one more epoch of stage 3, on one process, from the checkpoints of two
        parser = train_glance_focus.get_args_parser()
        train_glance_focus.main(parser.parse_args([*flags, "--stage", "3", "--epochs", "1", "1", "2"]))
    finally:
        torch.set_num_threads(threads)
    record = load_checkpoint_file(out / "stage3.pth")["record"]
    assert record["epoch"] == 2 and len(record["history"]) == 2 and len(record["process_digests"]) == 1
