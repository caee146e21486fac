"""The classifier blended with each artist's style prototype (issue 26): the pure functions and the model folder's
file (a trained folder's report and inference: tests/test_train.py)."""

import json

import numpy as np
import pytest

from analysis.prototypes import PROTOTYPE_TEMPERATURE, PROTOTYPE_WEIGHT, PrototypeBlend, class_prototypes
from artifacts.style_prototypes import PROTOTYPE_KEY, PROTOTYPES_FILE, read_prototypes, write_prototypes
from utils import UserError


def test_the_fixed_blend_is_half_the_classifier_at_temperature_0_05():
    """The choice pinned: measured on the long-tail worlds (docs/training.md), never tuned per run."""
    assert (PROTOTYPE_WEIGHT, PROTOTYPE_TEMPERATURE) == (0.5, 0.05)
    blend = PrototypeBlend(np.eye(3, dtype=np.float32))
    assert (blend.weight, blend.temperature) == (0.5, 0.05)


def test_prototypes_are_the_unit_mean_of_unit_vectors():
    vectors = np.array([[3.0, 0.0], [0.0, 0.5], [2.0, 2.0], [5.0, 5.0]], np.float32)
    prototypes = class_prototypes(vectors, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(prototypes, [[0.5 ** 0.5, 0.5 ** 0.5], [0.5 ** 0.5, 0.5 ** 0.5]], rtol=1e-6)
    # a long vector counts as much as a short one: each image is one vote for its artist's direction
    np.testing.assert_allclose(class_prototypes(vectors[:2], np.array([0, 0]), 1), prototypes[:1], rtol=1e-6)
    with pytest.raises(ValueError, match="class 2 has no vector"):
        class_prototypes(vectors, np.array([0, 0, 1, 1]), 3)


def test_a_tail_artist_near_its_prototype_wins_over_a_leaning_classifier():
    """The head leans to the artist with many works (0.6 against 0.35); the image's style vector sits on the tail
    artist's prototype, so the blend names the tail artist. A clear classifier with ambiguous prototypes keeps its
    answer; rows stay probabilities, and weight 0 is the classifier itself."""
    blend = PrototypeBlend(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32))
    leaning = np.array([[0.6, 0.35, 0.05]], np.float32)
    mixed = blend.probabilities(leaning, np.array([[0.05, 1.0]], np.float32))
    assert mixed.argmax() == 1 and mixed.sum() == pytest.approx(1.0)
    between = PrototypeBlend(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32))
    clear = np.array([[0.05, 0.9, 0.05]], np.float32)
    assert between.probabilities(clear, np.array([[0.7, 0.7]], np.float32)).argmax() == 1
    np.testing.assert_allclose(PrototypeBlend(blend.prototypes, weight=0.0).probabilities(leaning, np.ones((1, 2))),
                               leaning)


def test_the_folder_file_round_trips_and_a_mismatch_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "lsnet_t_artist"}))
    prototypes = class_prototypes(np.random.default_rng(0).normal(size=(6, 4)), np.array([0, 1, 2, 0, 1, 2]), 3)
    write_prototypes(tmp_path, PrototypeBlend(prototypes))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "lsnet_t_artist" and config[PROTOTYPE_KEY]["file"] == PROTOTYPES_FILE
    read = read_prototypes(tmp_path, config, 3)
    np.testing.assert_array_equal(read.prototypes, prototypes)
    assert (read.weight, read.temperature) == (0.5, 0.05)
    assert read_prototypes(tmp_path, {}, 3) is None  # no entry: the classifier alone
    with pytest.raises(UserError, match="3 prototypes for 4 classes") as err:
        read_prototypes(tmp_path, config, 4)
    assert "\n" not in str(err.value)
    (tmp_path / PROTOTYPES_FILE).unlink()
    with pytest.raises(UserError, match="cannot read the style prototypes"):
        read_prototypes(tmp_path, config, 3)
