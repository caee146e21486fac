"""Parameters and FLOPs with fvcore, the SKA operator included.

FLOPs are fvcore's counts, where one multiply-add is one FLOP (the convention of the LSNet paper). fvcore traces the
model with ``torch.jit`` and knows nothing of SKA, a custom autograd Function: :func:`ska_flop_handle` counts it as
k*k multiply-adds per output element.
"""

import math
import warnings
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore compiles a loss with the deprecated torch.jit.script
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ["SKA_OPS", "count_flops", "count_params", "ska_flop_handle"]

# Names of the SKA autograd Functions in a torch.jit trace, as fvcore reports them (portable path, Triton kernels).
SKA_OPS = ("prim::PythonOp._SKAFunction", "prim::PythonOp._SKATritonFunction")


def ska_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOPs of one SKA call: x (N, C, H, W) and w (N, G, k*k, H, W) give N*C*H*W*k*k multiply-adds."""
    return math.prod(get_shape(outputs[0])) * get_shape(inputs[1])[2]


def count_flops(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> FlopCountAnalysis:
    """fvcore's analysis of ``net(*inputs)`` with the SKA handle registered; evaluated here, so errors surface early.

    Raises:
        RuntimeError: the trace holds a custom Python op fvcore cannot count (e.g. SKA renamed): the total would
            silently leave it out.
    """
    analysis = FlopCountAnalysis(net, inputs).set_op_handle(**{op: ska_flop_handle for op in SKA_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        analysis.total()
    python_ops = sorted(op for op in analysis.unsupported_ops() if op.startswith("prim::PythonOp"))
    if python_ops:
        raise RuntimeError(f"fvcore cannot count the custom ops {python_ops}; "
                           "register a handle for them in perf/flop_count.py")
    return analysis


def count_params(net: nn.Module) -> int:
    """Number of parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())
