"""The classifier blended with each artist's style prototype (issue 26: artists with few works).

An artist's prototype is the mean of the L2-normalised texture style vectors (``LSNet.forward_texture``) of its
training images, normalised again. An image's class probabilities are then

    (1 - weight) x softmax(logits) + weight x softmax(cosine(vector, prototypes) / temperature)

A prototype needs no more than a few works to sit where the artist's marks are, while the classifier's head leans
towards the artists it saw most: on the fine-grained long-tail worlds of bench/bench_recipe.py --medium the blend
raised macro recall on every checkpoint measured and never lowered it (docs/training.md). The weight and the
temperature are fixed: chosen on two worlds at the last stop and confirmed, unchanged, on worlds of three other
seeds; they are not tuned per run, so no validation image chooses them.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["PROTOTYPE_TEMPERATURE", "PROTOTYPE_WEIGHT", "PrototypeBlend", "class_prototypes"]

PROTOTYPE_WEIGHT = 0.5  # the prototypes' share of the blended probabilities
PROTOTYPE_TEMPERATURE = 0.05  # of the softmax over cosine similarities (in [-1, 1])


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def class_prototypes(vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, D)`` float32 unit prototypes: the normalised mean of each class's unit ``vectors``."""
    labels = np.asarray(labels, dtype=np.int64)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"class {missing[0]} has no vector to make its prototype from")
    sums = np.zeros((num_classes, vectors.shape[1]), np.float64)
    np.add.at(sums, labels, _unit_rows(vectors.astype(np.float64)))
    return _unit_rows(sums).astype(np.float32)


@dataclass(frozen=True)
class PrototypeBlend:
    """Per-class prototypes and how much they count beside the classifier."""

    prototypes: np.ndarray  # (classes, D) unit rows
    weight: float = PROTOTYPE_WEIGHT
    temperature: float = PROTOTYPE_TEMPERATURE

    def probabilities(self, probs: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Blend the classifier's ``probs`` (N, C) with the softmax over ``vectors``' (N, D) cosine similarity to
        the prototypes; float32 rows that sum to 1."""
        similarity = _unit_rows(vectors.astype(np.float32)) @ self.prototypes.T / self.temperature
        similarity -= similarity.max(axis=1, keepdims=True)
        near = np.exp(similarity)
        near /= near.sum(axis=1, keepdims=True)
        return ((1.0 - self.weight) * probs + self.weight * near).astype(np.float32)
