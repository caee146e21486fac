"""The project's on-disk contracts, one module each.

- :mod:`artifacts.checkpoint`: checkpoint files (``.pth``): safe reading, strict loading, atomic saving.
- :mod:`artifacts.model_folder`: the model folder inference loads (``config.json`` schema, ``class_mapping.csv``
  placement, which checkpoint file), whatever wrote it: own runs, original-fork checkpoints, community folders,
  official LSNet weights.
- :mod:`artifacts.run_folder`: the training run folder (checkpoint keys, ``args.json``, ``train_log.txt`` records,
  TensorBoard, and the placement of ``class_mapping.csv`` and ``config.json``).
"""
