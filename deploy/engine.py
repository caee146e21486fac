"""Which engine runs a model: PyTorch, or onnxruntime on a cached, verified ONNX export of the model folder.

``engine="auto"`` (the scripts' ``--engine`` default) runs a model on the CPU with onnxruntime: the folder is exported
once by :func:`deploy.exporter.export_model` (checked against PyTorch on the probe images, within
:data:`deploy.export_onnx.FP32_RTOL`) into a cache entry keyed by the checkpoint's SHA-256, the architecture, the input
size, the folder's ``config.json`` and the exporter's versions, and reused afterwards. The graph computes both style
vectors (pooled and texture), so one entry serves either. A GPU, ``amp``/``compile`` (PyTorch features) and
glance-and-focus options keep PyTorch; a glance-and-focus folder, a missing onnxruntime and anything the exporter
cannot take fall back to PyTorch with one line saying why. ``engine="onnx"`` refuses those instead.

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
from typing import Any

import numpy as np
import torch

from artifacts.config_file import ONNX_FILE, REFERENCE_FILE, read_config
from artifacts.hub import resolve_hub_path
from artifacts.model_folder import ModelSpec, read_model_spec
from deploy.export_onnx import FP32_RTOL, INPUT_NAME, read_reference
from deploy.exporter import ExportOptions, export_model
from inference import loading
from inference.flags import ENGINES
from inference.glance_focus import FocusOptions, is_glance_focus_folder
from inference.onnx_model import OnnxModel
from inference.results import BatchedModel
from inference.threads import onnx_lanes, onnx_thread_settings
from utils import UserError, resolve_device

CACHE_ENV = "LSNET_CACHE"
ENGINE_FILE = "engine.json"  # the entry's key and the PyTorch model's data config
EXPORT_VERSION = 1  # bump when deploy/export_onnx.py changes the graph, so older cache entries are not reused


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


def cache_key(spec: ModelSpec, input_size: int | None) -> dict[str, Any]:
    """What an exported engine depends on: the weights (SHA-256), architecture, heads, input size, ``config.json``
    (preprocessing, ``multi_label``) and the exporter (this module's :data:`EXPORT_VERSION`, torch, onnx)."""
    with open(spec.checkpoint.path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"checkpoint_sha256": digest, "model": spec.name, "num_classes": spec.num_classes,
            "feature_dim": spec.feature_dim, "input_size": input_size or spec.input_size,
            "config": json.loads(json.dumps(spec.config, sort_keys=True, default=str)),
            "export_version": EXPORT_VERSION, "torch": torch.__version__, "onnx": _package_version("onnx")}


def entry_dir(key: dict[str, Any]) -> Path:
    """The cache folder of ``key``."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "onnx" / name


def _export(spec: ModelSpec, key: dict[str, Any], entry: Path) -> None:
    """Export ``spec`` into ``entry`` (verified against PyTorch), written aside and renamed into place."""
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
        _, data_config = loading.build_eval_transform(spec.build(), read_config(tmp)["input_size"], spec.config)
        (tmp / ENGINE_FILE).write_text(json.dumps({"key": key, "data_config": data_config}, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:  # another process cached it meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_entry(entry: Path, spec: ModelSpec, decode_threads: int | None) -> OnnxModel:
    """The cached engine, checked against its ``reference.json``; :class:`ValueError` when it is unusable. It
    reports the PyTorch model's checkpoint and data config, so galleries and versions agree across engines."""
    threads, session_config = onnx_thread_settings(decode_threads) if decode_threads is not None else (None, None)
    lanes = onnx_lanes(decode_threads) if decode_threads is not None else 1
    try:
        stored = json.loads((entry / ENGINE_FILE).read_text())
        model = OnnxModel(entry / ONNX_FILE, spec.class_names, read_config(entry), None, threads, session_config,
                          lanes)
        inputs, expected = read_reference(entry / REFERENCE_FILE)
        outputs = model.session.run(list(expected), {INPUT_NAME: inputs})
    except Exception as err:  # noqa: BLE001  (a missing or damaged file, whatever onnxruntime raises on it)
        raise ValueError(str(err).splitlines()[0][:160] if str(err) else type(err).__name__) from None
    for name, got in zip(expected, outputs, strict=True):
        if np.abs(got - expected[name]).max() > FP32_RTOL * np.abs(expected[name]).max():
            raise ValueError(f"its {name} output no longer matches {REFERENCE_FILE}")
    model.checkpoint = spec.checkpoint.path
    model.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in stored["data_config"].items()}
    return model


def cached_onnx_model(spec: ModelSpec, input_size: int | None = None,
                      decode_threads: int | None = None) -> OnnxModel:
    """``spec`` run by onnxruntime from the engine cache, exported (once) when it is not there or unusable."""
    key = cache_key(spec, input_size)
    entry = entry_dir(key)
    notice = f"engine: exporting {spec.checkpoint.path} to ONNX once, into {entry} (later runs reuse it)"
    if entry.is_dir():
        try:
            return _open_entry(entry, spec, decode_threads)
        except ValueError as err:
            notice = f"notice: the cached ONNX engine {entry} is unusable ({err}); exporting it again"
    print(notice, file=sys.stderr)
    _export(spec, key, entry)
    return _open_entry(entry, spec, decode_threads)


def onnx_obstacle(location: Path, device: Any, options: dict[str, Any]) -> tuple[str, bool] | None:
    """Why the model at ``location`` does not run on the ONNX engine, and whether ``auto`` says so (a GPU or
    PyTorch-only options are the user's choice, said nothing about); None when it can."""
    if options.get("amp") or options.get("compile"):
        return "--amp and --compile are PyTorch features", False
    if options.get("focus") not in (None, FocusOptions()):
        return "glance-and-focus options need PyTorch", False
    if resolve_device(device).type != "cpu":
        return "it runs on the GPU", False
    if is_glance_focus_folder(location):
        return "glance-and-focus folders are not exported to ONNX", True
    if find_spec("onnxruntime") is None or find_spec("onnx") is None:
        return "onnxruntime is not installed: pip install -r requirements-deploy.txt", False
    return None


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
        return loading.load_model_bundle(checkpoint, model_name, class_csv, decode_threads=decode_threads, **options)
    spec = read_model_spec(location, class_csv, model_name=model_name, num_classes=options.get("num_classes"),
                           feature_dim=options.get("feature_dim"),
                           require_class_names=options.get("require_class_names", False))
    try:
        return cached_onnx_model(spec, options.get("input_size"), decode_threads)
    except Exception as err:  # noqa: BLE001  (whatever the exporter cannot take: auto falls back, onnx reports)
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if engine == "onnx":
            raise UserError(f"--engine onnx cannot export {checkpoint} ({reason}); use --engine torch") from None
        print(f"engine: PyTorch for {checkpoint} (the ONNX export failed: {reason})", file=sys.stderr)
        return loading.load_model_bundle(checkpoint, model_name, class_csv, decode_threads=decode_threads, **options)
