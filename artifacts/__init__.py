"""The project's on-disk contracts, one module each.

- :mod:`artifacts.checkpoint`: checkpoint files (``.pth``): safe reading, strict loading, atomic saving.
- :mod:`artifacts.model_folder`: the model folder inference loads (``config.json`` schema, ``class_mapping.csv``
  placement, which checkpoint file), whatever wrote it: own runs, original-fork checkpoints, community folders,
  official LSNet weights.
"""
