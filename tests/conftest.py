"""Fixtures shared by several test modules."""

import os

import huggingface_hub.constants
import pytest
import torch

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path; returns a function that puts a checkpoint into a repository."""
    cache = tmp_path / "hf" / "hub"
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(var, value)
    # huggingface_hub reads these variables once, at import: set its constants as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, checkpoint: dict, filename: str = "pytorch_model.bin") -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(HUB_COMMIT)
        (repo / "snapshots" / HUB_COMMIT).mkdir(parents=True)
        torch.save(checkpoint, repo / "snapshots" / HUB_COMMIT / filename)

    return add


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers on two cores) each worker and the scripts it starts use
    one thread, so the workers do not fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
