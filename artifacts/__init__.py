"""The project's on-disk contracts, one module each.

- :mod:`artifacts.checkpoint`: checkpoint files (``.pth``, ``.safetensors``): safe reading, strict loading, atomic
  saving.
- :mod:`artifacts.model_folder`: the model folder inference loads (``config.json`` schema, ``class_mapping.csv``
  placement, which checkpoint file), whatever wrote it: own runs, original-fork checkpoints, community folders,
  official LSNet weights.
- :mod:`artifacts.config_file`: ``config.json`` reading/writing and the exported files' names (torch-free).
- :mod:`artifacts.hub`: ``hf-hub:OWNER/REPO[@revision]`` model folders through huggingface_hub's cache.
- :mod:`artifacts.run_folder`: the training run folder (checkpoint keys, ``args.json``, ``train_log.txt`` records,
  TensorBoard, and the placement of ``class_mapping.csv`` and ``config.json``).
- :mod:`artifacts.outputs`: the files inference writes (``batch_results.json``, ``<stem>_result.json``,
  ``features.npy`` + ``image_names.txt``, multi-label predictions) and their readers.
- :mod:`artifacts.atomic`: writing a set of files all or nothing, with one-line write errors.
"""
