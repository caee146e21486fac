"""Artist-model inference, one concern per module (the public API is re-exported by :mod:`predictor`).

- :mod:`inference.loading`: :func:`load_model_bundle` (a model folder, checkpoint or ``hf-hub:`` id -> a ready
  :class:`ArtistModel`, or an :class:`OnnxModel` for an exported folder) and the eval preprocessing.
- :mod:`inference.artist_model`: :class:`ArtistModel` (the PyTorch model: classify, extract features, run many
  files).
- :mod:`inference.onnx_model`: :class:`OnnxModel`, an exported folder (``model.onnx``) run by onnxruntime with the
  same API; imports neither torch nor timm.
- :mod:`inference.results`: the torch-free shared parts: :class:`BatchedModel` (the public API both models
  implement), :class:`BatchResult`, skipped files, image listing, top-k classes.
- :mod:`inference.batching`: :func:`run_batched` (decoding workers, batches, skipped files, progress).
- :mod:`inference.compiled`: a ``torch.compile``-d model that pads partial batches so it compiles once.
- :mod:`inference.flags`: the command-line flags every inference script shares.
- :mod:`inference.threads`: the thread policy (cores from affinity and cgroup quota, onnxruntime lanes and spinning);
  torch-free.
- :mod:`inference.pipeline`: :func:`ordered_map` (work items on a few threads, results in order: the ONNX lanes).
  Which engine runs a model (``--engine``) is :mod:`deploy.engine`'s choice: it exports to ONNX, above this package.

What inference writes to disk is :mod:`artifacts.outputs`'s business; what it reads is :mod:`artifacts.model_folder`'s.
"""
