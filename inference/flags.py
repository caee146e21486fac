"""The command-line flags every inference script shares."""

import argparse

from data.scan import default_workers
from utils import NumberRange


def add_runtime_args(parser: argparse.ArgumentParser, precision: bool = True) -> argparse.ArgumentParser:
    """The flags every inference script shares: ``--device``, ``--num-workers`` and, with ``precision``, ``--amp``
    and ``--compile`` (passed on to :func:`load_model_bundle` and :func:`run_batched`)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--num-workers", type=NumberRange(int, 0), default=min(8, default_workers()),
                        help="image decoding workers: threads taking turns with a CPU model, processes feeding a GPU "
                             "(default: CPU cores, at most 8)")
    if precision:
        parser.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the model: faster for many images after tens of seconds of compiling")
    return parser
