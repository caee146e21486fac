"""Fixtures shared by several test modules."""

import os
import shutil

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


@pytest.fixture(scope="module", autouse=True)
def _free_module_disk(request, tmp_path_factory):
    """Delete the temporary folders a test module made once all its tests passed.

    Trained checkpoints take 40-180 MB each, and a whole run left about 10 GB behind, more than a CI disk may have.
    ``tmp_path_retention_policy = "failed"`` removes each passing test's ``tmp_path``; this removes the module-scoped
    folders too. Under ``--dist loadfile`` a worker runs one module at a time, so the new folders are this module's.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers on two cores) each worker and the scripts it starts use
    one thread, so the workers do not fight over the cores. Scripts run their models with PyTorch
    (``--engine``'s default from ``LSNET_ENGINE``): ``auto`` would export every test's model to ONNX once, seconds
    per model; tests/test_engine.py tests the engines."""
    os.environ["LSNET_ENGINE"] = "torch"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# Modules that train models, slowest first (make test with --durations=0: about 155, 110, 100, 80, 60 and 55 s of
# work each). pytest-xdist hands out whole modules in collection order; starting the long ones first lets the two
# workers finish together instead of one running a long module alone at the end.
SLOWEST_MODULES = ("test_train.py", "test_demo.py", "test_multilabel_train.py", "test_glance_focus.py",
                   "test_inference.py", "test_metric_learning.py")


def pytest_collection_modifyitems(items):
    """Run :data:`SLOWEST_MODULES` first (stable: everything else keeps its order)."""
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
