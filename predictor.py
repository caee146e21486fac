"""Artist-model inference as importable functions: load a model once, then classify images and extract style features.

A web service or a node in an image-generation UI loads the model once and calls it per request::

    from predictor import load_model_bundle

    artist_model = load_model_bundle("runs/artists")          # a model folder or a checkpoint file
    artist_model.classify(pil_image, top_k=5)                  # [{"class_id", "class_name", "probability"}, ...]
    artist_model.extract_features(pil_image)                   # np.ndarray (feature_dim,), float32
    result = artist_model.run_directory("gallery/", mode="cluster", num_workers=4)   # a BatchResult

:func:`run_batched` is the generic part (decoding with worker threads or processes, batched inference, skipped-file
tracking, progress bar) that other prediction scripts reuse with their own per-batch computation.

This module is the public facade; the code lives in the :mod:`inference` package (loading, the model, batching),
:mod:`deploy.engine` (``load_model_bundle``'s ``engine``: PyTorch or onnxruntime on a cached export) and
in :mod:`artifacts` (the model folder it reads, the output files the scripts write).
"""

from artifacts.config_file import CONFIG_FILE
from artifacts.model_source import MODEL_FOLDER_FILES, ModelSource, resolve_model_source
from deploy.engine import load_model_bundle
from inference.artist_model import ArtistModel
from inference.batching import run_batched
from inference.flags import add_runtime_args, engine_options
from inference.glance_focus import FocusOptions, GlanceFocusModel
from inference.loading import build_eval_transform
from inference.onnx_model import OnnxModel
from inference.results import DESCRIPTORS, MODES, BatchedModel, BatchResult, ImageInput, SkippedImage, list_images

__all__ = [
    "ArtistModel",
    "BatchResult",
    "BatchedModel",
    "CHECKPOINT_FILES",
    "CONFIG_FILE",
    "DESCRIPTORS",
    "FocusOptions",
    "GlanceFocusModel",
    "ImageInput",
    "MODES",
    "ModelSource",
    "OnnxModel",
    "SkippedImage",
    "add_runtime_args",
    "build_eval_transform",
    "engine_options",
    "list_images",
    "load_model_bundle",
    "resolve_model_source",
    "run_batched",
]

# Checkpoint files looked for in a model folder, in this order (training output, published community models).
CHECKPOINT_FILES = MODEL_FOLDER_FILES
