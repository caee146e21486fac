"""Which engine runs a model: PyTorch, or onnxruntime on a cached, verified ONNX export of the model folder.

``engine="auto"`` (the scripts' ``--engine`` default) runs a model on the CPU with onnxruntime: the folder is exported
once by :func:`deploy.exporter.export_model` (checked against PyTorch on the probe images, within
:data:`deploy.reference.FP32_RTOL`) into a cache entry keyed by the SHA-256 of the checkpoint and class mapping files,
the folder's ``config.json``, the options that shape the model (architecture, heads, input size) and the exporter's
versions, and reused afterwards. The graph computes both style vectors (pooled and texture), so one entry serves
either. A GPU, ``amp``/``compile`` (PyTorch features) and glance-and-focus options keep PyTorch; a glance-and-focus
folder, a missing onnxruntime and anything the exporter cannot take fall back to PyTorch with one line saying why.
``engine="onnx"`` refuses those instead.

A cached entry is found and run without importing torch or timm (the key is made from the files, not from the
weights read by PyTorch): a cached run starts in about a second instead of several. This module imports the PyTorch
side (reading and checking the weights, the export, the PyTorch model) only when it exports or runs PyTorch.

The cache lives in ``$LSNET_CACHE``, else ``$XDG_CACHE_HOME/lsnet``, else ``~/.cache/lsnet`` (``onnx/<key>/``: an
exported folder plus ``engine.json``). An entry that no longer loads or no longer reproduces its ``reference.json`` is
exported again, with a one-line notice.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from artifacts.config_file import ONNX_FILE, REFERENCE_FILE, read_config
from artifacts.hub import resolve_hub_path
from artifacts.model_source import ModelSource, file_sha256, resolve_model_source
from data.class_mapping import read_class_mapping
from deploy.reference import FP32_RTOL, INPUT_NAME, read_reference
from errors import UserError
from inference.flags import ENGINES
from inference.glance_focus import FocusOptions, is_glance_focus_folder
from inference.onnx_model import OnnxModel
from inference.results import BatchedModel
from inference.threads import onnx_lanes, onnx_thread_settings

if TYPE_CHECKING:
    from artifacts.model_folder import ModelSpec

CACHE_ENV = "LSNET_CACHE"
ENGINE_FILE = "engine.json"  # the entry's key and the PyTorch model's data config
EXPORT_VERSION = 2  # bump when deploy/export_onnx.py changes the graph, so older cache entries are not reused
SHAPING_OPTIONS = ("model_name", "num_classes", "feature_dim", "input_size")  # options that change the export
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # CUDA, ROCm, WSL GPUs


def cache_dir() -> Path:
    """Where exported engines are cached: ``$LSNET_CACHE``, else ``$XDG_CACHE_HOME/lsnet``, else ``~/.cache/lsnet``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lsnet"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cache_key(source: ModelSource, options: dict[str, Any]) -> dict[str, Any]:
    """What an exported engine depends on, read from the files without PyTorch: the weights and class mapping
    (SHA-256), ``config.json`` (preprocessing, ``multi_label``), the :data:`SHAPING_OPTIONS` given and the exporter
    (this module's :data:`EXPORT_VERSION`, torch, onnx)."""
    class_csv = file_sha256(source.class_csv) if source.class_csv else None
    return {"checkpoint_sha256": file_sha256(source.checkpoint), "class_mapping_sha256": class_csv,
            "config": json.loads(json.dumps(source.config, sort_keys=True, default=str)),
            **{name: options.get(name) for name in SHAPING_OPTIONS},
            "export_version": EXPORT_VERSION, "torch": _package_version("torch"), "onnx": _package_version("onnx")}


def entry_dir(key: dict[str, Any]) -> Path:
    """The cache folder of ``key``."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "onnx" / name


def _export(spec: "ModelSpec", key: dict[str, Any], entry: Path) -> None:
    """Export ``spec`` into ``entry`` (verified against PyTorch), written aside and renamed into place."""
    from deploy.exporter import ExportOptions, export_model  # PyTorch: only when exporting
    from inference.loading import build_eval_transform

    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write the engine cache {entry.parent} ({err.strerror}); set {CACHE_ENV} to a "
                        "writable folder") from None
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its report; failures raise
            warnings.simplefilter("ignore")  # the tracer's warnings: the verification against PyTorch decides
            export_model(spec, ExportOptions(tmp, key["input_size"]))
        _, data_config = build_eval_transform(spec.build(), read_config(tmp)["input_size"], spec.config)
        (tmp / ENGINE_FILE).write_text(json.dumps({"key": key, "data_config": data_config}, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:  # another process cached it meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_entry(entry: Path, source: ModelSource, decode_threads: int | None) -> OnnxModel:
    """The cached engine, checked against its ``reference.json``; :class:`ValueError` when it is unusable. It
    reports the PyTorch model's checkpoint and data config, so galleries and versions agree across engines."""
    threads, session_config = onnx_thread_settings(decode_threads) if decode_threads is not None else (None, None)
    lanes = onnx_lanes(decode_threads) if decode_threads is not None else 1
    class_names = read_class_mapping(source.class_csv) if source.class_csv else None
    try:
        stored = json.loads((entry / ENGINE_FILE).read_text())
        model = OnnxModel(entry / ONNX_FILE, class_names, read_config(entry), None, threads, session_config, lanes)
        inputs, expected = read_reference(entry / REFERENCE_FILE)
        outputs = model.session.run(list(expected), {INPUT_NAME: inputs})
    except Exception as err:  # noqa: BLE001  (a missing or damaged file, whatever onnxruntime raises on it)
        raise ValueError(str(err).splitlines()[0][:160] if str(err) else type(err).__name__) from None
    for name, got in zip(expected, outputs, strict=True):
        if np.abs(got - expected[name]).max() > FP32_RTOL * np.abs(expected[name]).max():
            raise ValueError(f"its {name} output no longer matches {REFERENCE_FILE}")
    model.checkpoint = source.checkpoint
    model.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in stored["data_config"].items()}
    return model


def _cached_entry(source: ModelSource, key: dict[str, Any], decode_threads: int | None) -> tuple[OnnxModel | None,
                                                                                                  str]:
    """The engine cached under ``key`` (found and run without PyTorch), or None and the line to print before
    exporting it (the first export, or a notice that the entry is unusable)."""
    entry = entry_dir(key)
    if entry.is_dir():
        try:
            return _open_entry(entry, source, decode_threads), ""
        except ValueError as err:
            return None, f"notice: the cached ONNX engine {entry} is unusable ({err}); exporting it again"
    return None, f"engine: exporting {source.checkpoint} to ONNX once, into {entry} (later runs reuse it)"


def _runs_on_gpu(device: Any) -> bool:
    """Whether PyTorch would run on a GPU for ``device`` (None: CUDA when available); asks PyTorch only when a GPU
    device file exists, so a machine without one decides without importing torch."""
    if device is not None:
        return not str(device).startswith("cpu")
    if not any(Path(name).exists() for name in GPU_DEVICE_FILES):
        return False
    from utils import resolve_device  # torch: only where a GPU may be present

    return resolve_device(None).type != "cpu"


def onnx_obstacle(location: Path, device: Any, options: dict[str, Any]) -> tuple[str, bool] | None:
    """Why the model at ``location`` does not run on the ONNX engine, and whether ``auto`` says so (a GPU or
    PyTorch-only options are the user's choice, said nothing about); None when it can."""
    if options.get("amp") or options.get("compile"):
        return "--amp and --compile are PyTorch features", False
    if options.get("focus") not in (None, FocusOptions()):
        return "glance-and-focus options need PyTorch", False
    if _runs_on_gpu(device):
        return "it runs on the GPU", False
    if is_glance_focus_folder(location):
        return "glance-and-focus folders are not exported to ONNX", True
    if find_spec("onnxruntime") is None or find_spec("onnx") is None:
        return "onnxruntime is not installed: pip install -r requirements-deploy.txt", False
    return None


def _pytorch_bundle(checkpoint: str | os.PathLike, model_name: str | None, class_csv: str | os.PathLike | None,
                    decode_threads: int | None, options: dict[str, Any]) -> BatchedModel:
    from inference.loading import load_model_bundle as load_pytorch  # torch: only for the PyTorch engine

    return load_pytorch(checkpoint, model_name, class_csv, decode_threads=decode_threads, **options)


def load_model_bundle(checkpoint: str | os.PathLike, model_name: str | None = None,
                      class_csv: str | os.PathLike | None = None, *, engine: str = "torch",
                      decode_threads: int | None = None, **options: Any) -> BatchedModel:
    """:func:`inference.loading.load_model_bundle` (same arguments) run by ``engine``: ``torch`` (PyTorch, the
    default of the Python API), ``onnx`` (onnxruntime on a cached export) or ``auto`` (``onnx`` on the CPU when it
    can, else PyTorch; the scripts' default). An exported folder always runs with onnxruntime. ``decode_threads``:
    the image-decoding threads the caller runs beside the model (sizes the model's threads, see
    :mod:`inference.threads`; None leaves the runtimes' defaults)."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    location = resolve_hub_path(checkpoint)
    obstacle = None if engine == "torch" else onnx_obstacle(location, options.get("device"), options)
    if engine == "torch" or (location / ONNX_FILE).is_file() or obstacle:
        if obstacle and engine == "onnx":
            raise UserError(f"--engine onnx cannot run {checkpoint}: {obstacle[0]}; use --engine torch or auto")
        if obstacle and obstacle[1]:
            print(f"engine: PyTorch for {checkpoint} ({obstacle[0]})", file=sys.stderr)
        return _pytorch_bundle(checkpoint, model_name, class_csv, decode_threads, options)
    source = resolve_model_source(location, class_csv)
    key = cache_key(source, {**options, "model_name": model_name})
    model, notice = None, ""  # without class names where they are required, read_model_spec says what is missing
    if source.class_csv is not None or not options.get("require_class_names"):
        model, notice = _cached_entry(source, key, decode_threads)
    if model is not None:
        return model
    from artifacts.model_folder import read_model_spec  # PyTorch reads and checks the weights: only to export

    spec = read_model_spec(location, class_csv, model_name=model_name, num_classes=options.get("num_classes"),
                           feature_dim=options.get("feature_dim"),
                           require_class_names=options.get("require_class_names", False))
    try:
        print(notice, file=sys.stderr)
        _export(spec, key, entry_dir(key))
        return _open_entry(entry_dir(key), source, decode_threads)
    except Exception as err:  # noqa: BLE001  (whatever the exporter cannot take: auto falls back, onnx reports)
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if engine == "onnx":
            raise UserError(f"--engine onnx cannot export {checkpoint} ({reason}); use --engine torch") from None
        print(f"engine: PyTorch for {checkpoint} (the ONNX export failed: {reason})", file=sys.stderr)
        return _pytorch_bundle(checkpoint, model_name, class_csv, decode_threads, options)
