"""SKA: small-kernel dynamic aggregation (the "focus small" half of LS convolution).

    out[n, c, i, j] = sum_{a, b < k} x[n, c, i + a - p, j + b - p] * w[n, c mod G, a * k + b, i, j]

with zero padding outside the image and p = (k - 1) // 2; x is (N, C, H, W), w is (N, G, k*k, H, W).

Implementations, chosen with ``ska(x, w, impl=...)`` (or ``SKA(impl=...)``):

* ``"torch"``: portable autograd Function, any device and float dtype. Loops over the k*k offsets with in-place
  multiply-adds on shifted views, so neither a k*k copy of x nor a per-channel copy of w is ever built; float16 and
  bfloat16 are computed in float32.
* ``"triton"``: Triton kernels (:mod:`model.ska_triton`); CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``.
* ``"plain"``: :func:`ska_plain`, standard tensor ops only (pad, slice, multiply, add) with PyTorch's own autograd:
  the path TorchScript compiles (a scripted :class:`SKA` always takes it) and the one for export (ONNX).
* ``"reference"``: :func:`ska_reference`, the naive unfold version (tests and benchmarks only).
* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton is installed, else ``"torch"``.
"""

import importlib.util
import math
from collections.abc import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["HAS_TRITON", "IMPLS", "SKA", "ska", "ska_plain", "ska_reference"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = ("auto", "torch", "triton", "plain", "reference")


def ska_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Naive unfold implementation: materialises a k*k copy of x and repeats w over channel groups.

    Kept only as the reference for tests and benchmarks; never used by the models.
    """
    n, c, h, width = x.shape
    groups, kk = w.shape[1], w.shape[2]
    k = int(round(kk**0.5))
    cols = F.unfold(x, kernel_size=k, padding=(k - 1) // 2).view(n, c, kk, h, width)
    w_full = w.repeat(1, c // groups, 1, 1, 1)
    return (cols * w_full).sum(dim=2)


def ska_plain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SKA from standard tensor ops (zero pad, slices, multiply, add); TorchScript-compatible and exportable.

    Autograd is PyTorch's own; computes in the inputs' dtype and keeps one product per tap alive at a time.
    """
    n, c, h, width = x.shape
    groups, kk = w.shape[1], w.shape[2]
    k = 1
    while k * k < kk:
        k += 2
    p = (k - 1) // 2
    xp = F.pad(x, [p, p, p, p]).reshape(n, c // groups, groups, h + 2 * p, width + 2 * p)
    wg = w.unsqueeze(1)  # (N, 1, G, k*k, H, W): broadcasts over the C // G channels of each group
    out = xp[:, :, :, :h, :width] * wg[:, :, :, 0]
    for tap in range(1, kk):
        a, b = tap // k, tap % k
        out = out + xp[:, :, :, a:a + h, b:b + width] * wg[:, :, :, tap]
    return out.reshape(n, c, h, width)


def _shifts(k: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(offset, dy, dx)`` for every kernel tap, offset = a * k + b and (dy, dx) = (a - p, b - p)."""
    p = (k - 1) // 2
    for a in range(k):
        for b in range(k):
            yield a * k + b, a - p, b - p


def _spans(shift: int, size: int) -> tuple[slice, slice]:
    """Slices ``(dst, src)`` of one axis such that ``dst[i]`` reads ``src[i + shift]`` wherever both are in range."""
    lo = max(0, -shift)
    hi = max(lo, min(size, size - shift))
    return slice(lo, hi), slice(lo + shift, hi + shift)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h, width = x.shape[-2:]
    groups, kk = w.shape[1:3]
    xg = x.unflatten(1, (-1, groups))  # (N, C // G, G, H, W): a view, so w broadcasts over C // G
    wg = w.unsqueeze(1)  # (N, 1, G, k*k, H, W)
    out = torch.zeros_like(xg, memory_format=torch.contiguous_format)
    for off, dy, dx in _shifts(math.isqrt(kk)):
        (oy, sy), (ox, sx) = _spans(dy, h), _spans(dx, width)
        out[..., oy, ox].addcmul_(xg[..., sy, sx], wg[:, :, :, off, oy, ox])
    return out.flatten(1, 2)


def _backward_x(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h, width = grad.shape[-2:]
    groups, kk = w.shape[1:3]
    gg = grad.unflatten(1, (-1, groups))
    wg = w.unsqueeze(1)
    grad_x = torch.zeros_like(gg, memory_format=torch.contiguous_format)
    for off, dy, dx in _shifts(math.isqrt(kk)):
        (oy, sy), (ox, sx) = _spans(dy, h), _spans(dx, width)
        grad_x[..., sy, sx].addcmul_(gg[..., oy, ox], wg[:, :, :, off, oy, ox])
    return grad_x.flatten(1, 2)


def _backward_w(grad: torch.Tensor, x: torch.Tensor, w_shape: torch.Size) -> torch.Tensor:
    h, width = x.shape[-2:]
    groups, kk = w_shape[1:3]
    gg = grad.unflatten(1, (-1, groups))
    xg = x.unflatten(1, (-1, groups))
    grad_w = x.new_zeros(w_shape)
    for off, dy, dx in _shifts(math.isqrt(kk)):
        (oy, sy), (ox, sx) = _spans(dy, h), _spans(dx, width)
        grad_w[:, :, off, oy, ox] = (gg[..., oy, ox] * xg[..., sy, sx]).sum(1)
    return grad_w


class _SKAFunction(torch.autograd.Function):
    """Portable SKA; saves only x and w for backward.

    float16 and bfloat16 are computed in float32 on cast copies (linear in the input size, and much faster on CPU
    than mixed-dtype in-place ops); their products are exact in float32, so each result is rounded once.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        acc = _acc_dtype(x.dtype)
        return _forward(x.to(acc), w.to(acc)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        acc = _acc_dtype(x.dtype)
        grad_out = grad_out.to(acc)
        grad_x = _backward_x(grad_out, w.to(acc)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = _backward_w(grad_out, x.to(acc), w.shape).to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def _check_inputs(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 4 or w.dim() != 5:
        raise ValueError(f"ska expects x (N, C, H, W) and w (N, G, k*k, H, W), got {tuple(x.shape)}, {tuple(w.shape)}")
    n, c, h, width = x.shape
    groups, kk = w.shape[1:3]
    k = math.isqrt(kk)
    if k * k != kk or k % 2 == 0:
        raise ValueError(f"w.shape[2] must be k*k for an odd k, got {kk}")
    if groups == 0 or c % groups or w.shape != (n, groups, kk, h, width):
        raise ValueError(f"w must be (N, G, k*k, H, W) with G dividing C: x is {tuple(x.shape)}, w is {tuple(w.shape)}")


def _ska_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if not HAS_TRITON:
        raise RuntimeError("ska(impl='triton') needs the triton package; use impl='torch' or 'auto'")
    from .ska_triton import ska_triton  # imported on first use only: loading Triton is slow

    return ska_triton(x, w)


def ska(x: torch.Tensor, w: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Apply SKA (see module docstring) with the implementation ``impl``, one of :data:`IMPLS`.

    x and w of different dtypes are promoted to their common dtype first.
    """
    _check_inputs(x, w)
    if x.dtype != w.dtype:
        dtype = torch.promote_types(x.dtype, w.dtype)
        x, w = x.to(dtype), w.to(dtype)
    if impl == "auto":
        impl = "triton" if x.is_cuda and HAS_TRITON else "torch"
    if impl == "torch":
        return _SKAFunction.apply(x, w)
    if impl == "triton":
        return _ska_triton(x, w)
    if impl == "plain":
        return ska_plain(x, w)
    if impl == "reference":
        return ska_reference(x, w)
    raise ValueError(f"unknown SKA impl {impl!r}, expected one of {IMPLS}")


# Plain torch.fx tracing records these calls as graph nodes instead of tracing their shape checks and loops.
torch.fx.wrap("ska")
torch.fx.wrap("ska_plain")


@register_notrace_module  # a leaf for timm's FX feature extraction (and the graphs its tests script)
class SKA(nn.Module):
    """Module wrapper of :func:`ska`: ``forward(x, w)``; no parameters. TorchScript compiles the plain path."""

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown SKA impl {impl!r}, expected one of {IMPLS}")
        self.impl = impl

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or self.impl == "plain":
            out = ska_plain(x, w)
        else:
            out = ska(x, w, self.impl)
        return out

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
