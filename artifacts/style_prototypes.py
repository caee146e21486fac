"""The style prototypes of a model folder: ``style_prototypes.npy`` and its ``config.json`` entry (torch-free).

Training writes them at its end (each artist's texture prototype from its training images, at the best weights);
inference blends the classifier with them (:class:`analysis.prototypes.PrototypeBlend`) whenever a folder has them.
An exported folder (``export.py``) carries both.
"""

import os
from pathlib import Path
from typing import Any

import numpy as np

from analysis.prototypes import PrototypeBlend
from artifacts.atomic import OutputSet
from artifacts.config_file import CONFIG_FILE, read_config, write_config
from errors import UserError

__all__ = ["PROTOTYPES_FILE", "PROTOTYPE_KEY", "read_prototypes", "write_prototypes"]

PROTOTYPES_FILE = "style_prototypes.npy"  # (classes, D) float32: each artist's texture prototype
PROTOTYPE_KEY = "prototype_blend"  # config.json: {"file", "descriptor", "weight", "temperature"}


def write_prototypes(folder: str | os.PathLike, blend: PrototypeBlend) -> None:
    """Write ``blend``'s prototypes (:data:`PROTOTYPES_FILE`) and its ``config.json`` entry into a model folder."""
    folder = Path(folder)
    with OutputSet(folder) as out, out.open(PROTOTYPES_FILE, "wb") as f:
        np.save(f, blend.prototypes.astype(np.float32))
    entry = {"file": PROTOTYPES_FILE, "descriptor": "texture", "weight": blend.weight,
             "temperature": blend.temperature}
    write_config(folder, {**read_config(folder), PROTOTYPE_KEY: entry})


def read_prototypes(folder: Path | None, config: dict[str, Any], num_classes: int | None) -> PrototypeBlend | None:
    """The prototype blend ``config.json`` names in ``folder`` (None without an entry); checked against the class
    count."""
    entry = config.get(PROTOTYPE_KEY)
    if not isinstance(entry, dict) or folder is None:
        return None
    path = folder / str(entry.get("file", PROTOTYPES_FILE))
    try:
        prototypes = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the style prototypes {path} ({err}); copy the model folder again with it, or "
                        f"delete the {PROTOTYPE_KEY!r} entry of its {CONFIG_FILE} to classify without them") from None
    if prototypes.ndim != 2 or (num_classes is not None and prototypes.shape[0] != num_classes):
        raise UserError(f"{path} holds {prototypes.shape[0] if prototypes.ndim == 2 else '?'} prototypes for "
                        f"{num_classes} classes; train the model again, or delete the {PROTOTYPE_KEY!r} entry of "
                        f"its {CONFIG_FILE}")
    return PrototypeBlend(prototypes.astype(np.float32), float(entry["weight"]), float(entry["temperature"]))
