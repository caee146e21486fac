"""Tests of the SKA operator: the portable path against the unfold reference, and the Triton kernels on CPU.

Triton runs on CPU tensors only through its interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
Triton is imported; ``test_triton_interpreter`` therefore re-runs this file's ``test_interpreted_*`` tests in a
subprocess with that variable set. They are skipped in the normal run.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from model.ska import HAS_TRITON, SKA, ska, ska_plain, ska_reference
from perf.probes import transient_peak_bytes

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="run by test_triton_interpreter with TRITON_INTERPRET=1")

# (N, C, H, W, k, G)
SHAPES = [
    (1, 8, 5, 7, 3, 2),  # odd sizes, N = 1
    (2, 16, 6, 5, 3, 2),
    (2, 6, 7, 5, 5, 3),  # k = 5
    (3, 4, 2, 3, 5, 4),  # kernel larger than the image, G = C
    (2, 8, 1, 9, 3, 1),  # a single row, G = 1
]
TOLERANCES = {  # (atol, rtol) against float64 maths on the same (rounded) inputs
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0):
    n, c, h, w, k, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.randn(n, g, k * k, h, w, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return x, weights, grad


def value_and_grads(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, impl: str):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = ska(x, w, impl)
    return (out, *torch.autograd.grad(out, (x, w), grad))


def reference64(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor):
    return value_and_grads(x.double(), w.double(), grad.double(), "reference")


def assert_all_close(actual, expected, atol: float, rtol: float) -> None:
    for name, a, e in zip(("out", "grad_x", "grad_w"), actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_matches_definition():
    x, w, _ = make_inputs((2, 4, 3, 4, 3, 2), torch.float64)
    expected = torch.zeros_like(x)
    for n, c, i, j, a, b in torch.cartesian_prod(*(torch.arange(s) for s in (2, 4, 3, 4, 3, 3))).tolist():
        y, z = i + a - 1, j + b - 1
        if 0 <= y < 3 and 0 <= z < 4:
            expected[n, c, i, j] += x[n, c, y, z] * w[n, c % 2, a * 3 + b, i, j]
    torch.testing.assert_close(ska_reference(x, w), expected)
    torch.testing.assert_close(ska(x, w), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape):
    x, w, _ = make_inputs(shape)
    torch.testing.assert_close(ska(x, w), ska_reference(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_grads_match_reference(shape):
    x, w, grad = make_inputs(shape)
    assert_all_close(value_and_grads(x, w, grad, "torch"), value_and_grads(x, w, grad, "reference"), 1e-5, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_path_matches_reference(shape):
    x, w, grad = make_inputs(shape)
    assert_all_close(value_and_grads(x, w, grad, "plain"), value_and_grads(x, w, grad, "reference"), 1e-5, 1e-5)


def test_scripted_and_traced_module():
    """TorchScript compiles the plain path; FX (timm's tracer) keeps SKA as one leaf call; both give SKA's output."""
    from timm.models import get_notrace_modules

    x, w, _ = make_inputs((2, 8, 5, 7, 3, 2))
    expected = ska_reference(x, w)
    torch.testing.assert_close(torch.jit.script(SKA())(x, w), expected)
    torch.testing.assert_close(torch.jit.script(ska_plain)(x, w), expected)
    assert SKA in get_notrace_modules()
    traced = torch.fx.symbolic_trace(SKA())  # plain torch.fx records the ska() call as one node
    assert [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"] == ["ska"]
    torch.testing.assert_close(traced(x, w), expected)


@pytest.mark.parametrize("shape", [(1, 4, 4, 5, 3, 2), (2, 3, 3, 2, 5, 1)])
def test_gradcheck(shape):
    x, w, _ = make_inputs(shape, torch.float64)
    assert torch.autograd.gradcheck(ska, (x.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_dtypes(dtype):
    x, w, grad = make_inputs((2, 16, 7, 5, 3, 2), dtype)
    actual = value_and_grads(x, w, grad, "torch")
    assert [t.dtype for t in actual] == [dtype] * 3
    assert_all_close(actual, reference64(x, w, grad), *TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    # Products of float16/bfloat16 numbers are exact in float32, so float32 sums rounded once at the end stay within
    # one ulp of the exact result; accumulating in the input dtype rounds at every tap and drifts further.
    x, w, grad = make_inputs((2, 64, 7, 5, 3, 8), dtype)
    eps = torch.finfo(dtype).eps
    actual, expected = value_and_grads(x, w, grad, "torch"), reference64(x, w, grad)
    for name, a, e in zip(("out", "grad_x", "grad_w"), actual, expected, strict=True):
        assert ((a.double() - e).abs() <= eps * e.abs() + 1e-5).all(), name


def test_mixed_dtypes_are_promoted():
    x, w, grad = make_inputs((1, 4, 3, 5, 3, 2))
    x, w = x.requires_grad_(), w.double().requires_grad_()
    out = ska(x, w)
    assert out.dtype == torch.float64
    out.backward(grad.double())
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float64
    torch.testing.assert_close(out, ska_reference(x.double(), w))


def test_non_contiguous_inputs():
    x, w, grad = make_inputs((2, 8, 6, 7, 3, 4))
    x_nc = x.to(memory_format=torch.channels_last)[:, :, :, 1:]  # channels-last, then cropped
    w_nc = w.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)[..., 1:]
    grad_nc = grad.transpose(2, 3).contiguous().transpose(2, 3)[..., 1:]
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or grad_nc.is_contiguous())
    expected = value_and_grads(x_nc.contiguous(), w_nc.contiguous(), grad_nc.contiguous(), "reference")
    assert_all_close(value_and_grads(x_nc, w_nc, grad_nc, "torch"), expected, 1e-5, 1e-5)


def test_only_one_input_requires_grad():
    x, w, grad = make_inputs((1, 4, 3, 5, 3, 2))
    out = ska(x, w.requires_grad_())
    (grad_w,) = torch.autograd.grad(out, w, grad)
    torch.testing.assert_close(grad_w, value_and_grads(x, w, grad, "reference")[2])


def test_auto_uses_portable_path_on_cpu():
    x, w, _ = make_inputs((1, 4, 3, 5, 3, 2))
    assert type(ska(x, w.requires_grad_()).grad_fn).__name__ == "_SKAFunctionBackward"


def test_memory_stays_linear_in_input():
    x, w, grad = make_inputs((4, 64, 14, 14, 3, 8))
    x_bytes = x.numel() * x.element_size()
    fwd = transient_peak_bytes(lambda: ska(x, w), x.device)
    fwd_bwd = transient_peak_bytes(lambda: value_and_grads(x, w, grad, "torch"), x.device)
    reference = transient_peak_bytes(lambda: value_and_grads(x, w, grad, "reference"), x.device)
    # out; then out + grad_x + grad_w (9/8 of x here) + one product temporary. The reference holds the unfolded x,
    # the repeated w and their product (9 copies of x each) at once, which also shows that the measurement works.
    assert reference >= 27 * x_bytes
    assert fwd <= 1.1 * x_bytes
    assert fwd_bwd <= 4.5 * x_bytes


def test_module():
    x, w, _ = make_inputs((2, 8, 5, 7, 3, 2))
    module = SKA()
    assert not list(module.parameters()) and not module.state_dict()
    assert "impl='auto'" in repr(module)
    torch.testing.assert_close(module(x, w), ska_reference(x, w))
    torch.testing.assert_close(SKA(impl="reference")(x, w), ska_reference(x, w))


@pytest.mark.parametrize(
    "x_shape, w_shape",
    [
        ((1, 4, 3, 3), (1, 2, 4, 3, 3)),  # k even
        ((1, 4, 3, 3), (1, 2, 8, 3, 3)),  # k*k not a square
        ((1, 4, 3, 3), (1, 3, 9, 3, 3)),  # G does not divide C
        ((1, 4, 3, 3), (1, 2, 9, 3, 4)),  # spatial mismatch
        ((2, 4, 3, 3), (1, 2, 9, 3, 3)),  # batch mismatch
        ((4, 3, 3), (1, 2, 9, 3, 3)),  # x not 4-d
    ],
)
def test_invalid_shapes(x_shape, w_shape):
    with pytest.raises(ValueError):
        ska(torch.zeros(x_shape), torch.zeros(w_shape))


def test_invalid_impl():
    x, w, _ = make_inputs((1, 4, 3, 3, 3, 2))
    with pytest.raises(ValueError, match="unknown SKA impl"):
        ska(x, w, impl="cuda")
    with pytest.raises(ValueError, match="unknown SKA impl"):
        SKA(impl="cuda")


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton, and the interpreter off")
def test_triton_path_rejects_cpu_tensors_without_interpreter():
    x, w, _ = make_inputs((1, 4, 3, 3, 3, 2))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ska(x, w, impl="triton")


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; this is the driver of the interpreted tests")
def test_triton_interpreter():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_interpreted"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and re.fullmatch(r"\d+ passed.*", summary), proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "skipped" not in summary, summary


@interpreted
@pytest.mark.parametrize("shape", [(2, 8, 5, 7, 3, 4), (1, 6, 4, 3, 5, 2), (1, 4, 2, 3, 5, 4)])
def test_interpreted_triton_matches_portable_and_reference(shape):
    x, w, grad = make_inputs(shape)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    actual = value_and_grads(x_nc, w, grad, "triton")
    assert_all_close(actual, value_and_grads(x, w, grad, "torch"), 1e-5, 1e-5)
    assert_all_close(actual, value_and_grads(x, w, grad, "reference"), 1e-5, 1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_interpreted_triton_dtypes(dtype):
    x, w, grad = make_inputs((2, 8, 5, 3, 3, 2), dtype)
    actual = value_and_grads(x, w, grad, "triton")
    assert [t.dtype for t in actual] == [dtype] * 3
    assert_all_close(actual, reference64(x, w, grad), *TOLERANCES[dtype])


@interpreted
def test_interpreted_triton_gradcheck():
    x, w, _ = make_inputs((1, 2, 3, 2, 3, 1), torch.float64)
    inputs = (x.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: ska(a, b, "triton"), inputs, fast_mode=True)
