"""Triton kernels for SKA (see :mod:`model.ska` for the operator); reached through ``ska(x, w, impl="triton")``.

Every kernel works on one (sample, weight group) pair and a tile of pixels, with a tile of the C // G channels that
share that weight map as the second axis, and accumulates in float32 (float64 for float64 inputs):

* forward and backward-x are the same gather: ``dst[c, q] = sum_taps src[c, q + s] * w[tap, q + t]`` with
  (s, t) = (d, 0) for the forward and (-d, -d) for backward-x, d being the tap's (dy, dx) shift;
* backward-w reduces ``grad[c, q] * x[c, q + d]`` over the channels of a group inside one program, so it needs no
  atomics and is deterministic.

Importing this module imports Triton. With ``TRITON_INTERPRET=1`` set before that, the kernels run on CPU tensors
through Triton's interpreter (used by the tests).
"""

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["ska_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_TILE = 2048  # elements of a (channels, pixels) tile held by one program


@triton.jit
def _ska_gather_kernel(
    src_ptr,
    w_ptr,
    dst_ptr,
    C,
    G,
    H,
    W,
    K: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_ng = tl.program_id(0)  # n * G + g
    n = pid_ng // G
    g = pid_ng % G
    hw = H * W
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    pix_ok = pix < hw
    row_ok = rows < C // G
    py = pix // W
    px = pix % W
    plane = (n * C + rows * G + g).to(tl.int64)[:, None] * hw  # channel c = r * G + g of sample n
    w_base = w_ptr + pid_ng.to(tl.int64) * (K * K) * hw
    acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=ACC)
    for a in tl.static_range(K):
        for b in tl.static_range(K):
            if TRANSPOSE:
                sy = py - (a - (K - 1) // 2)
                sx = px - (b - (K - 1) // 2)
            else:
                sy = py + (a - (K - 1) // 2)
                sx = px + (b - (K - 1) // 2)
            ok = pix_ok & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
            spix = sy * W + sx
            wpix = spix if TRANSPOSE else pix
            wv = tl.load(w_base + (a * K + b) * hw + wpix, mask=ok, other=0.0).to(ACC)
            sv = tl.load(src_ptr + plane + spix[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)
            acc += sv.to(ACC) * wv[None, :]
    mask = row_ok[:, None] & pix_ok[None, :]
    tl.store(dst_ptr + plane + pix[None, :], acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ska_grad_w_kernel(
    grad_ptr,
    x_ptr,
    grad_w_ptr,
    C,
    G,
    H,
    W,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_ng = tl.program_id(0)  # n * G + g
    n = pid_ng // G
    g = pid_ng % G
    hw = H * W
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_ok = pix < hw
    py = pix // W
    px = pix % W
    out_base = grad_w_ptr + pid_ng.to(tl.int64) * (K * K) * hw
    for a in tl.static_range(K):
        for b in tl.static_range(K):
            sy = py + (a - (K - 1) // 2)
            sx = px + (b - (K - 1) // 2)
            ok = pix_ok & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
            acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=ACC)
            for r0 in range(0, C // G, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                plane = (n * C + rows * G + g).to(tl.int64)[:, None] * hw
                row_ok = (rows < C // G)[:, None]
                gv = tl.load(grad_ptr + plane + pix[None, :], mask=row_ok & pix_ok[None, :], other=0.0)
                xv = tl.load(x_ptr + plane + (sy * W + sx)[None, :], mask=row_ok & ok[None, :], other=0.0)
                acc += gv.to(ACC) * xv.to(ACC)
            grad_w = tl.sum(acc, axis=0)
            tl.store(out_base + (a * K + b) * hw + pix, grad_w.to(grad_w_ptr.dtype.element_ty), mask=pix_ok)


def _blocks(rows: int, pixels: int) -> tuple[int, int]:
    """Tile sizes (channels per group, pixels), powers of two with at most ``_MAX_TILE`` elements in all."""
    block_p = min(triton.next_power_of_2(pixels), 256)
    block_r = min(triton.next_power_of_2(rows), max(_MAX_TILE // block_p, 1))
    return block_r, block_p


def _acc(dtype: torch.dtype) -> tl.dtype:
    """Accumulator type: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton uses the current device); nothing to do for interpreted CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _gather(src: torch.Tensor, w: torch.Tensor, transpose: bool) -> torch.Tensor:
    n, c, h, width = src.shape
    groups, kk = w.shape[1:3]
    block_r, block_p = _blocks(c // groups, h * width)
    dst = torch.empty_like(src)
    grid = (n * groups, triton.cdiv(h * width, block_p), triton.cdiv(c // groups, block_r))
    with _device_guard(src):
        _ska_gather_kernel[grid](
            src,
            w,
            dst,
            c,
            groups,
            h,
            width,
            K=math.isqrt(kk),
            TRANSPOSE=transpose,
            ACC=_acc(src.dtype),
            BLOCK_R=block_r,
            BLOCK_P=block_p,
        )
    return dst


def _grad_w(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, c, h, width = x.shape
    groups, kk = w.shape[1:3]
    block_r, block_p = _blocks(c // groups, h * width)
    grad_w = torch.empty_like(w)
    grid = (n * groups, triton.cdiv(h * width, block_p))
    with _device_guard(x):
        _ska_grad_w_kernel[grid](
            grad, x, grad_w, c, groups, h, width, K=math.isqrt(kk), ACC=_acc(x.dtype), BLOCK_R=block_r, BLOCK_P=block_p
        )
    return grad_w


class _SKATritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w)
        return _gather(x, w, transpose=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = _gather(grad_out, w, transpose=True) if ctx.needs_input_grad[0] else None
        grad_w = _grad_w(grad_out, x, w) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def ska_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SKA with the Triton kernels; x and w share a float dtype, accumulated in float32 (float64 in float64)."""
    if not (x.is_cuda or _INTERPRET):
        raise ValueError("the Triton SKA path needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return _SKATritonFunction.apply(x, w)
