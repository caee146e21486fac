"""Train, calibrate and evaluate a glance-and-focus LSNet (GFNet) that reads high-resolution artwork in crops.

    python train_glance_focus.py --data-path dataset --output-dir runs/gf --init-from runs/artist
    python train_glance_focus.py --data-path dataset --output-dir runs/gf --calibrate-budget --eval

    torchrun --standalone --nproc_per_node=2 train_glance_focus.py --data-path dataset --output-dir runs/gf

    python train_glance_focus.py --config gf.yaml    # settings by flag name; flags given as well win

See docs/glance-focus.md. The three stages (``--stage 1|2|3|all``) resume from ``--output-dir``.
"""

import argparse

from gfnet.config import GlanceFocusConfig, get_args_parser
from gfnet.train import calibrate, evaluate, train
from training.distributed import start_process
from utils import cleanup_distributed, run_cli


def main(args: argparse.Namespace | None = None) -> dict:
    cfg = GlanceFocusConfig.from_args(args if args is not None else get_args_parser().parse_args())
    try:
        dist = start_process(cfg.work.device, cfg.work.seed)
        result: dict = {}
        if not (cfg.evaluation.eval or cfg.evaluation.calibrate_budget):
            result["folder"] = train(cfg, dist)
        if dist.is_main and cfg.evaluation.calibrate_budget:  # under torchrun the main process calibrates, evaluates
            result["budget_table"] = calibrate(cfg)
        if dist.is_main and cfg.evaluation.eval:
            result["eval"] = evaluate(cfg)
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
