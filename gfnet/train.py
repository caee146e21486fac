"""What ``train_glance_focus.py`` does: train the stages, calibrate the budget table, evaluate and draw crops."""

import json
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, DistributedSampler

from artifacts.checkpoint import load_checkpoint, load_checkpoint_file
from artifacts.config_file import read_config, write_json_atomic
from artifacts.glance_focus_folder import (
    create_model,
    init_encoders,
    load_model_folder,
    save_model_folder,
    update_gf_config,
)
from artifacts.model_source import resolve_model_source
from artifacts.run_folder import ARGS_FILE, args_record
from data.class_mapping import read_class_mapping
from data.datasets import dataset_classes
from inference.early_exit import budget_curve, exit_summary, threshold_thresholds
from inference.glance_focus_predictor import GlanceFocusPredictor
from perf.glance_focus import cumulative_gflops
from training.distributed import DistEnv
from utils import UserError, print_main, resolve_device

from .config import GlanceFocusConfig
from .dataset import build_gf_dataset, collate_views
from .evaluate import anytime_accuracy, collect_probs, evaluate_curve, plain_reference, write_curve
from .stages import run_stage

__all__ = ["train", "calibrate", "evaluate", "eval_loader", "plain_references"]


def _dataset(cfg: GlanceFocusConfig, split: str, classes: list[str], train: bool):
    """``--data-path/split`` as glance-and-focus views (training views when ``train``); an empty or missing split is
    a one-line error."""
    data_path = cfg.work.data_path
    dataset = build_gf_dataset(data_path, split, classes, cfg.views.glance_size, cfg.views.focus_resolution,
                               train=train)
    if len(dataset) == 0:
        raise UserError(f"{Path(data_path) / split} holds no images; run prepare_dataset.py first")
    return dataset


def eval_loader(cfg: GlanceFocusConfig, split: str, classes: list[str]) -> DataLoader:
    """``split`` in evaluation views (the centred window, no flip), in order."""
    dataset = _dataset(cfg, split, classes, train=False)
    return DataLoader(dataset, batch_size=cfg.stages.batch_size, num_workers=cfg.work.num_workers,
                      collate_fn=collate_views)


def _train_loader(cfg: GlanceFocusConfig, classes: list[str], dist: DistEnv) -> DataLoader:
    """This process's shard of ``train/`` in training views: a DistributedSampler reshuffled every epoch (as the
    main trainer's loaders without repeated augmentation), its workers seeded by the loader's own generator."""
    dataset, batch_size = _dataset(cfg, "train", classes, train=True), cfg.stages.batch_size
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=cfg.work.seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.work.num_workers,
                        collate_fn=collate_views, pin_memory=dist.device.type == "cuda", drop_last=True,
                        generator=torch.Generator())
    if len(loader) == 0:
        raise UserError(f"{len(sampler)} training images per process are fewer than --batch-size {batch_size};"
                        " lower --batch-size (or use fewer processes)")
    return loader


def _resume_previous(model, run_dir: Path, stage: int) -> None:
    """Before stage N (not yet started), take the weights stage N-1 ended with."""
    if stage == 1 or (run_dir / f"stage{stage}.pth").is_file():
        return
    previous = run_dir / f"stage{stage - 1}.pth"
    if not previous.is_file():
        raise UserError(f"--stage {stage} needs {previous} from stage {stage - 1}; run --stage {stage - 1} first")
    state = load_checkpoint_file(previous)
    if not state["record"]["done"]:
        raise UserError(f"stage {stage - 1} in {run_dir} is unfinished; rerun --stage {stage - 1} to complete it")
    model.load_state_dict(state["model"])


def train(cfg: GlanceFocusConfig, dist: DistEnv) -> Path:
    """Run the requested stages (resuming), then write the model folder ``--output-dir`` (the main process; the
    others wait until it is written)."""
    views, classes = cfg.views, dataset_classes(cfg.work.data_path)
    out = Path(cfg.work.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = create_model(views.model, len(classes), glance_size=views.glance_size, patch_size=views.patch_size,
                         focus_resolution=views.focus_resolution, focus_steps=views.focus_steps).to(dist.device)
    stages = cfg.stage_list()
    if views.init_from and stages[0] == 1 and not (out / "stage1.pth").is_file():
        init_encoders(model, views.init_from, log=print_main)
    loader = _train_loader(cfg, classes, dist)
    times = json.loads((out / "stage_times.json").read_text()) if (out / "stage_times.json").is_file() else {}
    _resume_previous(model, out, stages[0])  # later stages go on from the weights the one before ended with
    if dist.is_main:
        write_json_atomic(out / ARGS_FILE, args_record(cfg.settings(), world_size=dist.world_size,
                                                       distributed=dist.distributed))
    for stage in stages:
        record = run_stage(model, stage, loader, cfg.stage(stage, dist), out)
        times[f"stage{stage}"] = round(record["seconds"], 1)
        if dist.is_main:
            (out / "stage_times.json").write_text(json.dumps(times))
    if dist.is_main:
        save_model_folder(model.cpu(), views.model, out, classes, {"stage_seconds": times})
        print(f"model folder written: {out} (seconds per stage: {times})")
    dist.barrier()
    return out


def calibrate(cfg: GlanceFocusConfig) -> list[dict]:
    """Find the budget table on the ``--calibrate-on`` split (eval views) and store it in ``config.json``."""
    device, split = resolve_device(cfg.work.device), cfg.evaluation.calibrate_on
    model, classes, config = load_model_folder(cfg.work.output_dir, device)
    probs, labels = collect_probs(model, eval_loader(cfg, split, classes), device)
    table = budget_curve(probs, labels, cumulative_gflops(config["gf"]["step_gflops"]))
    update_gf_config(Path(cfg.work.output_dir), budget_table=table, budget_calibrated_on=split)
    print(f"budget table stored: {table[0]['avg_gflops']:.4f} to {table[-1]['avg_gflops']:.4f} GFLOPs per image")
    return table


def plain_references(cfg: GlanceFocusConfig, loader, classes: list[str], device: torch.device) -> dict:
    """``--reference`` (a plain artist model folder) measured on ``loader`` at each of ``--reference-sizes``."""
    reference = cfg.evaluation.reference
    if not reference:
        return {}
    source = resolve_model_source(reference)
    config = read_config(reference) if source.folder else {}
    if source.class_csv and read_class_mapping(source.class_csv) != classes:
        raise UserError(f"--reference {reference} has other classes than {cfg.work.data_path}")
    net = timm.create_model(config.get("model", "lsnet_t_artist"), num_classes=len(classes),
                            **({"feature_dim": config["feature_dim"]} if config.get("feature_dim") else {}))
    load_checkpoint(source.checkpoint, net, log=lambda _: None)
    net = net.to(device)
    refs = {}
    for size in cfg.evaluation.reference_sizes:
        ref = plain_reference(net, loader, device, size)
        refs[f"plain {ref['size']} px"] = ref
    return refs


def evaluate(cfg: GlanceFocusConfig) -> dict:
    """Anytime accuracy, budget curve (CSV + PNG in ``--output-dir/eval``) and references on the val split."""
    device, options = resolve_device(cfg.work.device), cfg.evaluation
    model, classes, config = load_model_folder(cfg.work.output_dir, device)
    loader = eval_loader(cfg, "val", classes)
    per_step = config["gf"]["step_gflops"]
    result = {"step_gflops": per_step}
    for policy in ("learned", "fallback", "random"):
        probs, labels = collect_probs(model, loader, device, policy)
        result[f"anytime_{policy}"] = anytime_accuracy(probs, labels)
        if policy == "learned":
            learned = probs
    curve = evaluate_curve(learned, labels, per_step, config["gf"].get("budget_table"))
    if options.exit_threshold is not None:
        thresholds = threshold_thresholds(model.focus_steps, options.exit_threshold)
        result["exit_threshold"] = exit_summary(learned, labels, thresholds, cumulative_gflops(per_step))
    refs = plain_references(cfg, loader, classes, device)
    csv_path, png = write_curve(Path(cfg.work.output_dir) / "eval", result["anytime_learned"], per_step, curve, refs)
    result.update(curve=curve, references=refs)
    _print_eval(result, cumulative_gflops(per_step), csv_path, png)
    if options.save_crops:
        _save_crops(GlanceFocusPredictor(model, classes, config, device), loader.dataset, Path(options.save_crops))
    return result


def _print_eval(result: dict, cumulative: list[float], csv_path: Path, png: Path) -> None:
    for policy in ("learned", "fallback", "random"):
        accs = " ".join(f"{a:.3f}" for a in result[f"anytime_{policy}"])
        print(f"anytime top-1 after each step ({policy} policy): {accs}")
    print("GFLOPs after each step: " + " ".join(f"{g:.4f}" for g in cumulative))
    if "exit_threshold" in result:
        r = result["exit_threshold"]
        print(f"exit threshold: top-1 {r['accuracy']:.3f} at {r['avg_gflops']:.4f} GFLOPs, {r['avg_steps']:.2f} steps")
    for name, ref in result["references"].items():
        print(f"{name}: top-1 {ref['accuracy']:.3f} at {ref['gflops']:.4f} GFLOPs")
    print(f"budget curve: {csv_path}, {png}")


def _save_crops(predictor: GlanceFocusPredictor, dataset, folder: Path, limit: int = 16) -> None:
    for path, _ in dataset.samples[:limit]:
        prediction = predictor.predict(path)
        predictor.save_crops(path, prediction, folder / Path(path).stem)
    print(f"crops drawn on {min(limit, len(dataset.samples))} images in {folder}")
