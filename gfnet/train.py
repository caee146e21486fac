"""What ``train_glance_focus.py`` does: train the stages, calibrate the budget table, evaluate and draw crops."""

import argparse
import json
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, DistributedSampler

from artifacts.checkpoint import load_checkpoint, load_checkpoint_file
from artifacts.config_file import read_config
from artifacts.glance_focus_folder import (
    create_model,
    init_encoders,
    load_model_folder,
    save_model_folder,
    update_gf_config,
)
from artifacts.model_folder import resolve_model_source
from data.class_mapping import read_class_mapping
from data.datasets import dataset_classes
from inference.early_exit import budget_curve, exit_summary, threshold_thresholds
from inference.glance_focus_predictor import GlanceFocusPredictor
from perf.glance_focus import cumulative_gflops
from training.distributed import DistEnv
from utils import UserError, print_main, resolve_device

from .dataset import build_gf_dataset, collate_views
from .evaluate import anytime_accuracy, collect_probs, evaluate_curve, plain_reference, write_curve
from .stages import TrainConfig, run_stage

__all__ = ["get_args_parser", "train", "calibrate", "evaluate", "eval_loader", "plain_references"]


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of ``train_glance_focus.py``."""
    parser = argparse.ArgumentParser("train_glance_focus", description="Train, calibrate and evaluate a "
                                     "glance-and-focus LSNet (GFNet) that reads high-resolution artwork in crops.")
    parser.add_argument("--data-path", required=True, help="prepared dataset with train/ and val/")
    parser.add_argument("--output-dir", required=True, help="run and model folder")
    parser.add_argument("--model", default="lsnet_t_gf", help="lsnet_t_gf, lsnet_s_gf or lsnet_b_gf")
    parser.add_argument("--stage", default="all", choices=["1", "2", "3", "all"])
    parser.add_argument("--glance-size", type=int, default=128, help="side of the whole-image glance")
    parser.add_argument("--patch-size", type=int, default=96, help="side of each focus crop")
    parser.add_argument("--focus-resolution", type=int, default=672,
                        help="short side of the image crops are read from (0: native size)")
    parser.add_argument("--focus-steps", type=int, default=4, help="focus steps T after the glance")
    parser.add_argument("--init-from", help="trained artist model folder (or LSNet checkpoint) for both encoders")
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 10, 10],
                        help="epochs of stage 1, 2, 3 (one value: all stages)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process under torchrun")
    parser.add_argument("--lr", type=float, default=1e-3, help="stage 1 (stage 3 uses a tenth)")
    parser.add_argument("--policy-lr", type=float, default=3e-4, help="stage 2 (PPO)")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate-budget", action="store_true",
                        help="store per-step exit thresholds for budgets (found on --calibrate-on) in config.json")
    parser.add_argument("--calibrate-on", default="train", metavar="SPLIT",
                        help="folder under --data-path the budget thresholds are found on (default: train; a held-out "
                             "split such as val or calib when the model has memorised a small train/)")
    parser.add_argument("--eval", action="store_true", help="evaluate the model folder on val/ (no training)")
    parser.add_argument("--exit-threshold", type=float, help="with --eval: also report this early-exit rule")
    parser.add_argument("--reference", help="with --eval: a plain artist model folder measured as reference")
    parser.add_argument("--reference-sizes", type=int, nargs="+", default=[224, 0],
                        help="sizes the reference is measured at (0: the full focus resolution)")
    parser.add_argument("--save-crops", help="with --eval: folder for val images with their crops drawn")
    return parser


def _dataset(args: argparse.Namespace, split: str, classes: list[str]):
    """``--data-path/split`` as glance-and-focus views; an empty or missing split is a one-line error."""
    dataset = build_gf_dataset(args.data_path, split, classes, args.glance_size, args.focus_resolution)
    if len(dataset) == 0:
        raise UserError(f"{Path(args.data_path) / split} holds no images; run prepare_dataset.py first")
    return dataset


def eval_loader(args: argparse.Namespace, split: str, classes: list[str]) -> DataLoader:
    """``split`` in evaluation views (the centred window, no flip), in order."""
    dataset = _dataset(args, split, classes)
    dataset.transform.train = False
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_views)


def _stage_list(stage: str) -> list[int]:
    return [1, 2, 3] if stage == "all" else [int(stage)]


def _train_loader(args: argparse.Namespace, classes: list[str], dist: DistEnv) -> DataLoader:
    """This process's shard of ``train/`` in training views: a DistributedSampler reshuffled every epoch (as the
    main trainer's loaders without repeated augmentation), its workers seeded by the loader's own generator."""
    dataset = _dataset(args, "train", classes)
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=collate_views, pin_memory=dist.device.type == "cuda", drop_last=True,
                        generator=torch.Generator())
    if len(loader) == 0:
        raise UserError(f"{len(sampler)} training images per process are fewer than --batch-size {args.batch_size};"
                        " lower --batch-size (or use fewer processes)")
    return loader


def _stage_config(args: argparse.Namespace, stage: int, dist: DistEnv) -> TrainConfig:
    epochs = args.epochs[min(stage - 1, len(args.epochs) - 1)]
    lr = args.policy_lr if stage == 2 else args.lr * (0.1 if stage == 3 else 1.0)
    return TrainConfig(epochs=epochs, lr=lr, dist=dist, amp=args.amp, accumulation_steps=args.accumulation_steps,
                       seed=args.seed)


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


def train(args: argparse.Namespace, dist: DistEnv) -> Path:
    """Run the requested stages (resuming), then write the model folder ``--output-dir`` (the main process; the
    others wait until it is written)."""
    classes = dataset_classes(args.data_path)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = create_model(args.model, len(classes), glance_size=args.glance_size, patch_size=args.patch_size,
                         focus_resolution=args.focus_resolution, focus_steps=args.focus_steps).to(dist.device)
    stages = _stage_list(args.stage)
    if args.init_from and stages[0] == 1 and not (out / "stage1.pth").is_file():
        init_encoders(model, args.init_from, log=print_main)
    loader = _train_loader(args, classes, dist)
    times = json.loads((out / "stage_times.json").read_text()) if (out / "stage_times.json").is_file() else {}
    _resume_previous(model, out, stages[0])  # later stages go on from the weights the one before ended with
    for stage in stages:
        record = run_stage(model, stage, loader, _stage_config(args, stage, dist), out)
        times[f"stage{stage}"] = round(record["seconds"], 1)
        if dist.is_main:
            (out / "stage_times.json").write_text(json.dumps(times))
    if dist.is_main:
        save_model_folder(model.cpu(), args.model, out, classes, {"stage_seconds": times})
        print(f"model folder written: {out} (seconds per stage: {times})")
    dist.barrier()
    return out


def calibrate(args: argparse.Namespace) -> list[dict]:
    """Find the budget table on the ``--calibrate-on`` split (eval views) and store it in ``config.json``."""
    device = resolve_device(args.device)
    model, classes, config = load_model_folder(args.output_dir, device)
    probs, labels = collect_probs(model, eval_loader(args, args.calibrate_on, classes), device)
    table = budget_curve(probs, labels, cumulative_gflops(config["gf"]["step_gflops"]))
    update_gf_config(Path(args.output_dir), budget_table=table, budget_calibrated_on=args.calibrate_on)
    print(f"budget table stored: {table[0]['avg_gflops']:.4f} to {table[-1]['avg_gflops']:.4f} GFLOPs per image")
    return table


def plain_references(args: argparse.Namespace, loader, classes: list[str], device: torch.device) -> dict:
    """``--reference`` (a plain artist model folder) measured on ``loader`` at each of ``--reference-sizes``."""
    if not args.reference:
        return {}
    source = resolve_model_source(args.reference)
    config = read_config(args.reference) if source.folder else {}
    if source.class_csv and read_class_mapping(source.class_csv) != classes:
        raise UserError(f"--reference {args.reference} has other classes than {args.data_path}")
    net = timm.create_model(config.get("model", "lsnet_t_artist"), num_classes=len(classes),
                            **({"feature_dim": config["feature_dim"]} if config.get("feature_dim") else {}))
    load_checkpoint(source.checkpoint, net, log=lambda _: None)
    net = net.to(device)
    refs = {}
    for size in args.reference_sizes:
        ref = plain_reference(net, loader, device, size)
        refs[f"plain {ref['size']} px"] = ref
    return refs


def evaluate(args: argparse.Namespace) -> dict:
    """Anytime accuracy, budget curve (CSV + PNG in ``--output-dir/eval``) and references on the val split."""
    device = resolve_device(args.device)
    model, classes, config = load_model_folder(args.output_dir, device)
    loader = eval_loader(args, "val", classes)
    per_step = config["gf"]["step_gflops"]
    result = {"step_gflops": per_step}
    for policy in ("learned", "fallback", "random"):
        probs, labels = collect_probs(model, loader, device, policy)
        result[f"anytime_{policy}"] = anytime_accuracy(probs, labels)
        if policy == "learned":
            learned = probs
    curve = evaluate_curve(learned, labels, per_step, config["gf"].get("budget_table"))
    if args.exit_threshold is not None:
        thresholds = threshold_thresholds(model.focus_steps, args.exit_threshold)
        result["exit_threshold"] = exit_summary(learned, labels, thresholds, cumulative_gflops(per_step))
    refs = plain_references(args, loader, classes, device)
    csv_path, png = write_curve(Path(args.output_dir) / "eval", result["anytime_learned"], per_step, curve, refs)
    result.update(curve=curve, references=refs)
    _print_eval(result, cumulative_gflops(per_step), csv_path, png)
    if args.save_crops:
        _save_crops(GlanceFocusPredictor(model, classes, config, device), loader.dataset, Path(args.save_crops))
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
