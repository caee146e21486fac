"""The glance-and-focus model folder: ``model_best.pth`` + ``class_mapping.csv`` + ``config.json`` (``"gf"`` entry)."""

import os
from pathlib import Path
from typing import Any

import torch

from artifacts.checkpoint import guess_architecture, load_checkpoint, read_checkpoint, save_checkpoint_atomic
from artifacts.config_file import read_config, write_config
from artifacts.model_folder import build_config
from artifacts.model_source import BEST_FILE, resolve_model_source
from data.class_mapping import CLASS_MAPPING_FILE, read_class_mapping, write_class_mapping
from model.glance_focus import BACKBONE_ARGS, GF_MODELS, GlanceFocus, create_glance_focus
from model.lsnet import HEAD_PREFIXES
from perf.glance_focus import step_gflops
from utils import UserError

__all__ = ["GF_SETTINGS", "create_model", "init_encoders", "save_model_folder", "load_model_folder",
           "update_gf_config"]

GF_SETTINGS = ("backbone", "local_backbone", "glance_size", "patch_size", "focus_resolution", "focus_steps",
               "hidden_dim")


def create_model(model_name: str, num_classes: int, **settings: Any) -> GlanceFocus:
    """A glance-and-focus model (``lsnet_t_gf``, ``lsnet_s_gf`` or ``lsnet_b_gf``) with the given GF settings."""
    if model_name not in GF_MODELS:
        raise UserError(f"unknown glance-and-focus model {model_name!r}; use {', '.join(GF_MODELS)}")
    settings = {k: v for k, v in settings.items() if v is not None and k != "backbone"}
    return create_glance_focus(model_name, num_classes, **settings)


def init_encoders(model: GlanceFocus, folder: str | os.PathLike, log=print) -> str:
    """Initialise both encoders from a trained artist model folder (or LSNet checkpoint); returns its architecture."""
    ckpt = read_checkpoint(resolve_model_source(folder).checkpoint)
    arch = guess_architecture(ckpt.state_dict)
    backbone = {k: v for k, v in ckpt.state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    for name, encoder in (("global", model.global_encoder), ("local", model.local_encoder)):
        own_arch = model.backbone if name == "global" else model.local_backbone
        if arch is None or BACKBONE_ARGS.get(arch) != BACKBONE_ARGS[own_arch]:
            raise UserError(f"{folder} holds {arch or 'unrecognised'} weights but the {name} encoder is {own_arch}; "
                            "pick the glance-and-focus model of the same size (--model lsnet_t_gf, lsnet_s_gf or "
                            "lsnet_b_gf)")
        encoder.load_state_dict(backbone, strict=True)
    log(f"encoders initialised from {folder} ({arch})")
    return arch


def save_model_folder(model: GlanceFocus, model_name: str, folder: Path, classes: list[str],
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the weights, ``class_mapping.csv`` and ``config.json`` (GF settings, GFLOPs per step); return config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint_atomic({"model": model.state_dict()}, folder / BEST_FILE)
    write_class_mapping(folder / CLASS_MAPPING_FILE, classes)
    old = read_config(folder).get("gf", {})
    gf = {k: getattr(model, k) for k in GF_SETTINGS if hasattr(model, k)}
    gf["hidden_dim"] = model.classifier.hidden_dim
    gf["step_gflops"] = step_gflops(model)
    gf.update({k: v for k, v in old.items() if k in ("budget_table", "budget_calibrated_on")})
    gf.update(extra or {})
    config = build_config(model_name, model, model.glance_size, squash=True, gf=gf)
    write_config(folder, config)
    return config


def update_gf_config(folder: Path, **entries: Any) -> None:
    """Add entries (e.g. the budget table) to the ``gf`` part of ``folder/config.json``."""
    config = read_config(folder)
    config.setdefault("gf", {}).update(entries)
    write_config(folder, config)


def weights_file(folder: str | os.PathLike, config: dict[str, Any]) -> Path:
    """The weights file of a GF model folder (``config.json``'s ``checkpoint``, else ``model_best.pth``)."""
    return Path(folder) / str(config.get("checkpoint") or BEST_FILE)


def load_model_folder(folder: str | os.PathLike, device: torch.device | str = "cpu"
                      ) -> tuple[GlanceFocus, list[str], dict[str, Any]]:
    """The model (eval mode, on ``device``), its class names and its ``config.json`` from a GF model folder."""
    folder = Path(folder)
    config = read_config(folder)
    if "gf" not in config or not str(config.get("model", "")).endswith("_gf"):
        raise UserError(f"{folder} is not a glance-and-focus model folder (config.json has no 'gf' entry); "
                        "train one with train_glance_focus.py")
    classes = read_class_mapping(folder / CLASS_MAPPING_FILE)
    gf = config["gf"]
    model = create_model(config["model"], len(classes), **{k: gf.get(k) for k in GF_SETTINGS})
    load_checkpoint(weights_file(folder, config), model, log=lambda _: None)
    return model.to(device).eval(), classes, config
