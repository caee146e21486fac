"""Train, calibrate and evaluate a glance-and-focus LSNet (GFNet) that reads high-resolution artwork in crops.

    python train_glance_focus.py --data-path dataset --output-dir runs/gf --init-from runs/artist
    python train_glance_focus.py --data-path dataset --output-dir runs/gf --calibrate-budget --eval

    torchrun --standalone --nproc_per_node=2 train_glance_focus.py --data-path dataset --output-dir runs/gf

See docs/glance-focus.md. The three stages (``--stage 1|2|3|all``) resume from ``--output-dir``.
"""

import argparse

from gfnet.train import calibrate, evaluate, train
from training.distributed import start_process
from utils import UserError, cleanup_distributed, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("train_glance_focus", description=__doc__.split("\n\n")[0])
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


def main(args: argparse.Namespace | None = None) -> dict:
    args = args if args is not None else get_args_parser().parse_args()
    if args.patch_size < 32 or args.glance_size < 32 or args.focus_steps < 1 or args.accumulation_steps < 1:
        raise UserError("--patch-size and --glance-size must be at least 32, --focus-steps and "
                        "--accumulation-steps at least 1")
    try:
        dist = start_process(args.device, args.seed)
        result: dict = {}
        if not (args.eval or args.calibrate_budget):
            result["folder"] = train(args, dist)
        if dist.is_main and args.calibrate_budget:  # under torchrun the main process calibrates and evaluates
            result["budget_table"] = calibrate(args)
        if dist.is_main and args.eval:
            result["eval"] = evaluate(args)
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
