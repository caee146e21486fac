"""Load an artist model once, ready for inference: a model folder or checkpoint file -> :class:`ArtistModel`."""

import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.utils import reparameterize_model
from torch import nn

from artifacts.config_file import ONNX_FILE
from artifacts.hub import resolve_hub_path
from artifacts.model_folder import read_model_spec
from data.transforms import build_inference_transform
from inference.artist_model import ArtistModel
from inference.glance_focus import FocusOptions, is_glance_focus_folder, load_glance_focus_model
from inference.onnx_model import load_onnx_model
from inference.results import BatchedModel
from inference.threads import compute_threads, onnx_lanes, onnx_thread_settings
from utils import UserError, resolve_device


def build_eval_transform(
    model: nn.Module, input_size: int | None = None, config: dict[str, Any] | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """The eval preprocessing of the model's timm ``pretrained_cfg`` at ``input_size``, and its data config.

    The one evaluation preprocessing (:func:`data.transforms.build_inference_transform`, as training's validation
    runs it): resize the short side to ``int(input_size / crop_pct)`` (bicubic) and center crop to a uint8 tensor;
    :func:`data.transforms.normalize_batch` with the config's ``mean``/``std`` completes it on whole batches
    (:meth:`ArtistModel.run_model` does). A ``config.json``'s ``crop_pct``/``crop_mode``/``mean``/``std``/
    ``interpolation`` override the model's defaults (a model fine-tuned with ``crop_mode="squash"`` is evaluated
    that way).
    """
    config = config or {}
    args = {key: config.get(key) for key in ("crop_pct", "crop_mode", "mean", "std", "interpolation")}
    if input_size is not None:
        args["input_size"] = (3, input_size, input_size)
    data_config = resolve_data_config(args=args, model=model)
    return build_inference_transform(data_config), data_config


def load_model_bundle(
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    class_csv: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
    feature_dim: int | None = None,
    amp: bool = False,
    require_class_names: bool = False,
    compile: bool = False,
    focus: FocusOptions | None = None,
    decode_threads: int | None = None,
) -> BatchedModel:
    """Load an artist model (checkpoint file or model folder) ready for inference: eval mode, BN fused.

    An exported folder (holding ``model.onnx``, see ``export.py``) gives an :class:`inference.onnx_model.OnnxModel`
    run by onnxruntime on the CPU (``model_name``, ``device``, ``amp``, ``compile`` and the checks do not apply);
    A glance-and-focus folder (``train_glance_focus.py``) gives an :class:`inference.glance_focus.GlanceFocusModel`
    read as ``focus`` says; anything else an :class:`ArtistModel`. ``checkpoint`` may be an
    ``hf-hub:OWNER/REPO[@revision]`` id.

    Args:
        checkpoint: a ``.pth`` file, or a folder with ``model_best.pth``/``best_checkpoint.pth``/``checkpoint.pth``,
            ``class_mapping.csv`` and an optional ``config.json`` naming the architecture under ``model``.
        model_name: architecture; default: the folder's ``config.json``, else the config or training arguments
            stored in the checkpoint.
        class_csv: the ``class_mapping.csv`` from training (default: the folder's); needed to classify.
        device: default cuda when available, else cpu.
        input_size: default the checkpoint's training size, else the config's, else the model's.
        num_classes, feature_dim: optional checks; detected from the weights and the class mapping.
        amp: autocast (float16 on CUDA, bfloat16 on CPU).
        require_class_names: fail early (before reading the weights) when no class mapping is available.
        compile: run the model through :func:`utils.compile_for_inference` (the first batch compiles it).
        decode_threads: image-decoding threads the caller runs beside the model: with it, a CPU model's threads
            are sized by :mod:`inference.threads` (None: the runtimes' defaults).

    Raises:
        UserError: missing files, unknown or wrong architecture, or class count / feature size disagreements.
    """
    location = resolve_hub_path(checkpoint)
    if (location / ONNX_FILE).is_file():
        threads = onnx_thread_settings(decode_threads) if decode_threads is not None else (None, None)
        lanes = onnx_lanes(decode_threads) if decode_threads is not None else 1
        return load_onnx_model(location, class_csv, input_size, require_class_names, *threads, lanes)
    if is_glance_focus_folder(location):
        return load_glance_focus_model(location, device, focus)
    if focus is not None and focus != FocusOptions():
        raise UserError(f"{checkpoint} is not a glance-and-focus model: --exit-threshold, --budget and --save-crops "
                        "apply to folders written by train_glance_focus.py")
    device = resolve_device(device)
    if decode_threads is not None and device.type == "cpu":
        torch.set_num_threads(compute_threads())
    spec = read_model_spec(location, class_csv, model_name=model_name, num_classes=num_classes,
                           feature_dim=feature_dim, require_class_names=require_class_names)
    net = reparameterize_model(spec.build().eval(), inplace=True).to(device)
    transform, data_config = build_eval_transform(net, spec.input_size if input_size is None else input_size,
                                                 spec.config)
    return ArtistModel(net, transform, spec.class_names, device=device, amp=amp, model_name=spec.name,
                       data_config=data_config, checkpoint=spec.checkpoint.path, config=spec.config, compile=compile)
