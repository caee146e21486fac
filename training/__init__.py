"""The training engine, one concern per module.

- :mod:`training.flags`: the flags of both training scripts and ``--config run.yaml``.
- :mod:`training.config`: :class:`TrainConfig`, built once from the parsed flags.
- :mod:`training.distributed`: ``torchrun`` set-up (:class:`DistEnv`).
- :mod:`training.factory`: model, teacher, mixup, optimizer and scheduler.
- :mod:`training.loaders`, :mod:`training.loops`, :mod:`training.metrics`: data, train / validate passes, metrics.
- :mod:`training.resume`: continuing and evaluating checkpoints.
- :mod:`training.trainer`: :func:`fit`, the training job.

The run folder it writes is :mod:`artifacts.run_folder`'s.
"""
