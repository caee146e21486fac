#!/usr/bin/env python3
"""Glance and focus at full size: anytime top-1, the budgeted curve and the plain references on one validation set.

For each world (``texture``: tools/make_texture_world.py, where only a 2-3 px texture identifies the artist;
``demo``: tools/make_synthetic_artists.py, what ``make demo`` uses, split by prepare_dataset.py) it runs the real
scripts as a user would: a plain ``lsnet_t_artist`` (train_artist_style.py) at 224 px and at the full image size,
then train_glance_focus.py (the three stages, encoders initialised from the plain 224 model), its budget calibration
and its ``--eval``. Every figure is measured on the same ``val/`` images: top-1 after each step with the learned
policy, the fallback (the glance's most activated regions) and random crops; the accuracy vs average GFLOPs curve;
the two plain models with their GFLOPs (gfnet.evaluate.plain_reference). Steps whose outputs exist are reused (with
the times they took). Writes ``results.json`` and ``results.md`` in ``--work-dir`` and each world's curve under
``WORLD/gf/eval/``. Slow on a CPU: run it in the background.

    nohup python bench/bench_glance_focus.py --work-dir runs/gfbench > runs/gfbench.log 2>&1 &
    nohup python bench/bench_glance_focus.py --work-dir runs/gfbench2 --worlds texture --everywhere --train 45 \
        --plain-epochs 8 --full-epochs 2 --gf-epochs 8 3 3 > runs/gfbench2.log 2>&1 &

The figures and what they mean are in docs/glance-focus.md ("Measured"); on 2 shared CPU cores the two runs took
about 70 and 40 minutes.
"""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from artifacts.config_file import read_config
from data.class_mapping import CLASS_MAPPING_FILE, read_class_mapping
from gfnet.config import GlanceFocusConfig
from gfnet.config import get_args_parser as gf_args_parser
from gfnet.evaluate import write_curve
from gfnet.train import eval_loader, evaluate, plain_references
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]  # the scripts run from here

WORLDS = ("texture", "demo")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_glance_focus.py", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/gfbench", help="data, model folders and results go here")
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=WORLDS)
    parser.add_argument("--artists", type=int, default=3, help="texture world: artists")
    parser.add_argument("--train", type=int, default=30, help="texture world: training images per artist")
    parser.add_argument("--val", type=int, default=12, help="texture world: validation images per artist")
    parser.add_argument("--texture-size", type=int, default=768, help="texture world: image side (square)")
    parser.add_argument("--amplitude", type=float, default=24.0, help="texture world: texture contrast")
    parser.add_argument("--everywhere", action="store_true",
                        help="texture world: texture over the whole image, not only inside the shapes")
    parser.add_argument("--demo-artists", type=int, default=4)
    parser.add_argument("--demo-images", type=int, default=40, help="demo world: images per artist (80/20 split)")
    parser.add_argument("--demo-size", type=int, default=512, help="demo world: image side")
    parser.add_argument("--glance-size", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--focus-steps", type=int, default=3)
    parser.add_argument("--gf-epochs", type=int, nargs=3, default=[10, 3, 3], help="epochs of stages 1, 2, 3")
    parser.add_argument("--gf-batch-size", type=int, default=12)
    parser.add_argument("--gf-lr", type=float, default=2e-3)
    parser.add_argument("--plain-epochs", type=int, default=15, help="plain model at 224 px")
    parser.add_argument("--full-epochs", type=int, default=5, help="plain model at the full size (slow)")
    parser.add_argument("--batch-size", type=int, default=16, help="plain model at 224 px")
    parser.add_argument("--full-batch-size", type=int, default=8, help="plain model at the full size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--seed", type=int, default=0)
    return parser


class Steps:
    """Runs commands (printed first), skipping those whose output exists; keeps each step's seconds."""

    def __init__(self, work: Path, threads: int):
        self.work, self.times_file = work, work / "step_seconds.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads)}

    def run(self, name: str, command: list, done: bool) -> float:
        """Run ``command`` in the repository root unless ``done`` (its output exists); return its seconds."""
        shown = " ".join(shlex.quote(str(c)) for c in ["python", *command])
        if done and name in self.times:
            print(f"== {name}: reusing the earlier result ({self.times[name]:.0f} s)\n   {shown}", flush=True)
            return self.times[name]
        print(f"== {name}\n$ {shown}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=self.env, check=True)
        self.times[name] = round(time.perf_counter() - start, 1)
        self.times_file.write_text(json.dumps(self.times, indent=2))
        return self.times[name]


def make_world(steps: Steps, world: str, args: argparse.Namespace) -> tuple[Path, int]:
    """Generate (and split) the world's data; returns the dataset folder and its full image side."""
    root = steps.work / world
    if world == "texture":
        data, side = root / "data", args.texture_size
        steps.run(f"{world}: generate", ["tools/make_texture_world.py", "--output", data, "--artists", args.artists,
                                         "--train", args.train, "--val", args.val, "--size", side, side,
                                         "--amplitude", args.amplitude, "--seed", args.seed,
                                         *(["--everywhere"] if args.everywhere else [])], (data / "val").is_dir())
        return data, side
    raw, data, side = root / "raw", root / "data", args.demo_size
    steps.run(f"{world}: generate", ["tools/make_synthetic_artists.py", "--output-dir", raw, "--num-artists",
                                     args.demo_artists, "--images-per-artist", args.demo_images, "--size", side,
                                     "--seed", args.seed, "--overwrite"], raw.is_dir())
    steps.run(f"{world}: prepare", ["prepare_dataset.py", "--source-dir", raw, "--output-dir", data, "--seed",
                                    args.seed, "--yes", "--min-images", 2, "--workers", 1], (data / "val").is_dir())
    return data, side


def train_plain(steps: Steps, world: str, data: Path, size: int, epochs: int, batch: int,
                args: argparse.Namespace) -> dict:
    """A plain lsnet_t_artist trained by train_artist_style.py at ``size`` px; its folder and seconds."""
    out = steps.work / world / f"plain{size}"
    seconds = steps.run(f"{world}: plain {size}", [
        "train_artist_style.py", "--data-path", data, "--output-dir", out, "--model", "lsnet_t_artist",
        "--input-size", size, "--epochs", epochs, "--batch-size", batch, "--num-workers", 0,
        "--seed", args.seed, "--device", "cpu"], (out / "model_best.pth").is_file())
    return {"folder": out, "seconds": seconds, "epochs": epochs, "size": size}


def train_gf(steps: Steps, world: str, data: Path, side: int, init: Path, args: argparse.Namespace) -> dict:
    """train_glance_focus.py: the three stages, then the budget calibration; returns the flags and the times."""
    out = steps.work / world / "gf"
    flags = ["--data-path", data, "--output-dir", out, "--glance-size", args.glance_size, "--patch-size",
             args.patch_size, "--focus-resolution", side, "--focus-steps", args.focus_steps, "--workers", 0,
             "--device", "cpu", "--seed", args.seed]
    command = ["train_glance_focus.py", *flags, "--init-from", init, "--epochs", *args.gf_epochs, "--batch-size",
               args.gf_batch_size, "--lr", args.gf_lr]
    train_s = steps.run(f"{world}: gf train", command, (out / "model_best.pth").is_file())
    calibrated = "budget_table" in read_config(out)["gf"]
    calib_s = steps.run(f"{world}: gf calibrate", ["train_glance_focus.py", *flags, "--calibrate-budget"], calibrated)
    stage_s = json.loads((out / "stage_times.json").read_text())
    shown = " ".join(["python", *(os.path.relpath(c, ROOT) if isinstance(c, Path) else str(c) for c in command)])
    return {"folder": out, "command": shown, "train_seconds": train_s, "calibrate_seconds": calib_s,
            "stage_seconds": stage_s}


def measure(data: Path, side: int, gf: dict, plains: list[dict], args: argparse.Namespace) -> dict:
    """``--eval`` of the GF folder and both plain models on the same val images; the curve redrawn with both."""
    cfg = GlanceFocusConfig.from_args(gf_args_parser().parse_args([str(flag) for flag in (
        "--data-path", data, "--output-dir", gf["folder"], "--glance-size", args.glance_size, "--patch-size",
        args.patch_size, "--focus-resolution", side, "--batch-size", args.gf_batch_size, "--workers", 0, "--device",
        "cpu", "--eval", "--exit-threshold", 0.9)]))
    classes = read_class_mapping(Path(gf["folder"]) / CLASS_MAPPING_FILE)
    start = time.perf_counter()
    result = evaluate(cfg)
    loader = eval_loader(cfg, "val", classes)
    refs = {}
    for plain in plains:
        sizes = (plain["size"] if plain["size"] != side else 0,)
        with_reference = dataclasses.replace(cfg, evaluation=dataclasses.replace(
            cfg.evaluation, reference=str(plain["folder"]), reference_sizes=sizes))
        for name, ref in plain_references(with_reference, loader, classes, torch.device("cpu")).items():
            refs[f"{name} (trained at {plain['size']} px)"] = {**ref, "train_seconds": plain["seconds"],
                                                               "epochs": plain["epochs"]}
    write_curve(Path(gf["folder"]) / "eval", result["anytime_learned"], result["step_gflops"], result["curve"], refs)
    result["references"] = refs
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["val_images"] = len(loader.dataset)
    return result


def run_world(steps: Steps, world: str, args: argparse.Namespace) -> dict:
    """Data, the two plain models, glance and focus, and the measurements of one world."""
    data, side = make_world(steps, world, args)
    plains = [train_plain(steps, world, data, 224, args.plain_epochs, args.batch_size, args)]
    gf = train_gf(steps, world, data, side, plains[0]["folder"], args)
    plains.append(train_plain(steps, world, data, side, args.full_epochs, args.full_batch_size, args))
    result = measure(data, side, gf, plains, args)
    return {"side": side, "data": str(data), "gf_folder": str(gf["folder"]),
            "gf_command": gf["command"],
            "stage_seconds": gf["stage_seconds"], "calibrate_seconds": gf["calibrate_seconds"],
            **{k: v for k, v in result.items() if k != "curve"},
            "curve": [{k: r[k] for k in ("avg_gflops", "accuracy", "avg_steps")} for r in result["curve"]]}


def markdown(results: dict, args: argparse.Namespace) -> str:
    """Tables of every world: anytime top-1 per policy, references, budgeted curve, times."""
    lines = [f"Machine: {results['machine']}; torch threads {args.threads}.", ""]
    for world, r in results["worlds"].items():
        cum = [sum(r["step_gflops"][:t + 1]) for t in range(len(r["step_gflops"]))]
        lines += [f"### {world} world ({r['side']} px, {r['val_images']} val images)", "",
                  "| step | GFLOPs | learned | fallback | random |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {t} | {g:.3f} | {r['anytime_learned'][t]:.3f} | {r['anytime_fallback'][t]:.3f} | "
                  f"{r['anytime_random'][t]:.3f} |" for t, g in enumerate(cum)]
        lines += ["", "| reference | top-1 | GFLOPs | training |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {ref['accuracy']:.3f} | {ref['gflops']:.3f} | {ref['epochs']} epochs, "
                  f"{ref['train_seconds']:.0f} s |" for name, ref in r["references"].items()]
        e = r["exit_threshold"]
        lines += ["", "| average GFLOPs | top-1 | average focus steps |", "| --- | --- | --- |"]
        lines += [f"| {row['avg_gflops']:.3f} | {row['accuracy']:.3f} | {row['avg_steps']:.2f} |"
                  for row in thin(r["curve"])]
        lines += [f"| {e['avg_gflops']:.3f} (exit threshold 0.9) | {e['accuracy']:.3f} | {e['avg_steps']:.2f} |",
                  "", f"Seconds per stage: {r['stage_seconds']}; calibration {r['calibrate_seconds']:.0f} s. "
                  f"`{r['gf_command']}`", ""]
    return "\n".join(lines)


def thin(curve: list[dict], rows: int = 6) -> list[dict]:
    """About ``rows`` rows of the curve, spread over its compute range, duplicates dropped."""
    seen, out = set(), []
    for i in sorted({round(k * (len(curve) - 1) / (rows - 1)) for k in range(rows)}):
        key = (round(curve[i]["avg_gflops"], 3), round(curve[i]["accuracy"], 3))
        if key not in seen:
            seen.add(key)
            out.append(curve[i])
    return out


def main(args: argparse.Namespace | None = None) -> dict:
    args = args if args is not None else get_args_parser().parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work, args.threads)
    cpu = platform.processor() or platform.machine()
    results = {"machine": f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}", "settings": {
        k: v for k, v in vars(args).items() if k != "work_dir"}, "worlds": {}}
    for world in args.worlds:
        torch.manual_seed(args.seed)
        results["worlds"][world] = run_world(steps, world, args)
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (work / "results.md").write_text(markdown(results, args))
    print((work / "results.md").read_text())
    return results


if __name__ == "__main__":
    run_cli(main)
