"""Train, calibrate and evaluate a glance-and-focus LSNet (GFNet) that reads high-resolution artwork in crops.

    python train_glance_focus.py --data-path dataset --output-dir runs/gf --init-from runs/artist
    python train_glance_focus.py --data-path dataset --output-dir runs/gf --calibrate-budget --eval

    torchrun --standalone --nproc_per_node=2 train_glance_focus.py --data-path dataset --output-dir runs/gf

See docs/glance-focus.md. The three stages (``--stage 1|2|3|all``) resume from ``--output-dir``.
"""

import argparse

from gfnet.train import calibrate, evaluate, get_args_parser, train
from training.distributed import start_process
from utils import UserError, cleanup_distributed, run_cli


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
