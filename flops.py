"""Count the parameters and FLOPs of LSNet and other timm models with fvcore, the SKA operator included.

    python flops.py --model lsnet_t lsnet_s lsnet_b        # 0.3 / 0.5 / 1.3 GFLOPs at 224, as in the paper
    python flops.py --model lsnet_t_artist --resolution 448 --num-classes 100 --by-operator

FLOPs are fvcore's counts, where one multiply-add is one FLOP (the convention of the paper); SKA, a custom autograd
Function fvcore knows nothing of, is counted as k*k multiply-adds per output element (``perf.flop_count``). The model
is counted as trained (BatchNorms unfused, as the paper's figures are); ``--fused`` counts the inference model of
``timm.utils.reparameterize_model`` instead (about 1% fewer FLOPs).
"""

import argparse
from collections import Counter
from typing import Any

import timm
import torch
from timm.utils import reparameterize_model

import model  # noqa: F401  (registers the LSNet models with timm)
from perf.flop_count import count_flops, count_params
from utils import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("flops", description="Parameters and FLOPs (fvcore, SKA included) of models.")
    parser.add_argument("--model", nargs="+", default=["lsnet_t"], help="one or more timm model names")
    parser.add_argument("--resolution", type=int, default=224, help="square input size")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--fused", action="store_true", help="count the BatchNorm-fused inference model")
    parser.add_argument("--by-operator", action="store_true", help="also print the FLOPs of every operator type")
    return parser


def _format_by_operator(by_operator: Counter) -> str:
    return "\n".join(f"    {op:<28} {flops / 1e9:8.4f} G" for op, flops in by_operator.most_common())


def main(args: argparse.Namespace | None = None) -> list[dict[str, Any]]:
    """Print params and GFLOPs of every ``--model``; return ``{"model", "resolution", "params", "flops"}`` rows."""
    args = args if args is not None else get_args_parser().parse_args()
    if args.resolution < 1 or args.num_classes < 0:
        raise UserError("--resolution must be positive and --num-classes 0 or more")
    rows = []
    for name in args.model:
        if not timm.is_model(name):
            raise UserError(f"unknown model {name!r}; use a timm model name such as lsnet_t or lsnet_t_artist")
        net = timm.create_model(name, num_classes=args.num_classes).eval()
        if args.fused:
            reparameterize_model(net, inplace=True)
        params = count_params(net)
        with torch.no_grad():
            analysis = count_flops(net, (torch.randn(1, 3, args.resolution, args.resolution),))
        flops = analysis.total()
        rows.append({"model": name, "resolution": args.resolution, "params": params, "flops": flops})
        print(f"{name} at {args.resolution}{' (fused)' if args.fused else ''}: {params / 1e6:.2f} M params, "
              f"{flops / 1e9:.3f} GFLOPs ({flops / 1e9:.1f} G)")
        if args.by_operator:
            print(_format_by_operator(analysis.by_operator()))
    return rows


if __name__ == "__main__":
    run_cli(main)
