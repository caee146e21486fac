"""The command-line flags every inference script shares."""

import argparse
import os
from typing import Any

from data.scan import default_workers
from errors import NumberRange, UserError

# What runs the model (deploy.engine.load_model_bundle): auto = onnxruntime on a cached export on the CPU when it can,
# else PyTorch; torch; onnx.
ENGINES = ("auto", "torch", "onnx")
ENGINE_ENV = "LSNET_ENGINE"  # the scripts' default --engine where it is set (e.g. torch: every run on PyTorch)


def default_engine() -> str:
    """``--engine``'s default: ``$LSNET_ENGINE``, else auto."""
    engine = os.environ.get(ENGINE_ENV) or "auto"
    if engine not in ENGINES:
        raise UserError(f"{ENGINE_ENV}={engine!r} is not an engine; set it to one of {', '.join(ENGINES)} or unset it")
    return engine


def add_runtime_args(parser: argparse.ArgumentParser, precision: bool = True) -> argparse.ArgumentParser:
    """The flags every inference script shares: ``--device``, ``--engine``, ``--num-workers`` and, with
    ``precision``, ``--amp`` and ``--compile`` (passed on to :func:`load_model_bundle`, see :func:`engine_options`,
    and :func:`run_batched`)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--engine", choices=ENGINES, default=default_engine(),
                        help="what runs the model: auto (onnxruntime on the CPU, the model exported once into a "
                             "cache and checked against PyTorch; PyTorch on a GPU), torch or onnx (default: "
                             f"${ENGINE_ENV}, else auto)")
    parser.add_argument("--num-workers", type=NumberRange(int, 0), default=min(8, default_workers()),
                        help="image decoding workers: threads taking turns with a CPU model, processes feeding a GPU "
                             "(default: CPU cores, at most 8)")
    if precision:
        parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the model: faster for many images after tens of seconds of compiling")
    return parser


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`load_model_bundle` arguments of :func:`add_runtime_args`'s ``--engine`` and ``--num-workers``."""
    return {"engine": args.engine, "decode_threads": args.num_workers}
