"""Artist-model inference, one concern per module (the public API is re-exported by :mod:`predictor`).

- :mod:`inference.loading`: :func:`load_model_bundle` (a model folder or checkpoint -> a ready
  :class:`ArtistModel`) and the eval preprocessing.
- :mod:`inference.artist_model`: :class:`ArtistModel` (classify, extract features, run many files) and
  :class:`BatchResult`.
- :mod:`inference.batching`: :func:`run_batched` (decoding workers, batches, skipped files, progress) and
  :func:`list_images`.
- :mod:`inference.compiled`: a ``torch.compile``-d model that pads partial batches so it compiles once.
- :mod:`inference.flags`: the command-line flags every inference script shares.

What inference writes to disk is :mod:`artifacts.outputs`'s business; what it reads is :mod:`artifacts.model_folder`'s.
"""
