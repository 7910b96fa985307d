"""pytest-benchmark: each quantizer, forward + backward, every backend side by side.

Run:  pytest benchmarks/benchmark_quant.py --benchmark-json=quant.json
      python benchmarks/ratios.py quant.json

Each group holds one op on one shape; beside expcuda's backends it times the
naive autograd composition a user would write, torch's own fused fake-quant
where one exists, and the memory-traffic floor (``x.clone(); grad.clone()``).
"""

from __future__ import annotations

import pytest
import torch

import expcuda
from expcuda import backends
from expcuda import quant as Q

ACT_SHAPE = (128, 32, 18, 18)
# the low-precision convolutions of the SVHN net at width 1 (conv0 stays full precision)
WEIGHT_SHAPES = ((64, 48, 3, 3), (128, 64, 3, 3), (512, 128, 5, 5))
OURS = ("reference", "cpu", "triton", "cuda")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fwd_bwd(fn, x, grad, *params):
    """A callable doing one forward + backward of ``fn`` on fresh leaves."""
    def call():
        leaf = x.detach().requires_grad_(True)
        out = fn(leaf, *params)
        out.backward(grad)
        for p in params:
            p.grad = None
        sync()
    return call


def ours(name, fn):
    """``fn`` run on expcuda backend ``name``; skipped where it cannot run."""
    reason = backends.why_not(name, device(), torch.float32)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")

    def run(*args):
        with expcuda.use_backend(name):
            return fn(*args)
    return run


def ste(value, through):
    """value in the forward pass, the gradient of ``through`` in the backward pass."""
    return through + (value - through).detach()


# --------------------------------------------------------------------------- DoReFa activations

def composed_dorefa_activation(x, bits):
    n = 2**bits - 1
    c = x.clamp(0, 1)
    return ste(torch.round(c * n) / n, c)


@pytest.mark.parametrize("impl", OURS + ("composition", "torch_fake_quant", "floor"))
@pytest.mark.parametrize("bits", (2, 4))
def test_dorefa_activation(benchmark, impl, bits):
    benchmark.group = f"dorefa_activation bits={bits} {ACT_SHAPE}"
    x = torch.randn(ACT_SHAPE, device=device())
    grad = torch.randn_like(x)
    n = 2**bits - 1
    if impl == "composition":
        fn = lambda t: composed_dorefa_activation(t, bits)  # noqa: E731
    elif impl == "torch_fake_quant":
        fn = lambda t: torch.fake_quantize_per_tensor_affine(t, 1.0 / n, 0, 0, n)  # noqa: E731
    elif impl == "floor":
        benchmark(lambda: (x.clone(), grad.clone(), sync()))
        return
    else:
        fn = ours(impl, lambda t: Q.dorefa_activation(t, bits))
    benchmark(fwd_bwd(fn, x, grad))


@pytest.mark.parametrize("impl", ("cpu-packed-mask", "cpu-recompute"))
def test_dorefa_activation_backward_only(benchmark, impl):
    """The saved-state choice: the STE mask packed as bits, or recomputed from the saved input."""
    benchmark.group = f"dorefa_activation backward only {ACT_SHAPE}"
    if backends.why_not("cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("cpu backend unavailable")
    x = torch.randn(ACT_SHAPE)
    grad = torch.randn_like(x)
    ops = torch.ops.expcuda_C
    if impl == "cpu-packed-mask":
        _, mask = ops.dorefa_activation_fwd(x, 2)
        benchmark(lambda: ops.mask_bwd(grad, mask))
    else:
        benchmark(lambda: ops.dorefa_activation_bwd_recompute(grad, x, 2))


# --------------------------------------------------------------------------- sign activations

@pytest.mark.parametrize("impl", OURS + ("composition", "floor"))
def test_sign_activation(benchmark, impl):
    benchmark.group = f"sign_activation {ACT_SHAPE}"
    x = torch.randn(ACT_SHAPE, device=device())
    grad = torch.randn_like(x)
    if impl == "floor":
        benchmark(lambda: (x.clone(), grad.clone(), sync()))
        return
    if impl == "composition":
        fn = lambda t: ste(torch.sign(t), t.clamp(-1, 1))  # noqa: E731
    else:
        fn = ours(impl, Q.sign_activation)
    benchmark(fwd_bwd(fn, x, grad))


# --------------------------------------------------------------------------- LSQ

def composed_lsq(x, s, bits):
    qp = 2**bits - 1
    g = 1.0 / (x.numel() * qp) ** 0.5
    s = ste(s, s * g)
    v = (x / s).clamp(0, qp)
    return ste(torch.round(v), v) * s


@pytest.mark.parametrize("impl", OURS + ("composition", "torch_learnable_fake_quant", "floor"))
def test_lsq(benchmark, impl):
    benchmark.group = f"lsq bits=4 unsigned {ACT_SHAPE}"
    x = torch.randn(ACT_SHAPE, device=device())
    grad = torch.randn_like(x)
    step = torch.tensor(0.1, device=device(), requires_grad=True)
    if impl == "floor":
        benchmark(lambda: (x.clone(), grad.clone(), sync()))
        return
    if impl == "composition":
        fn = lambda t, s: composed_lsq(t, s, 4)  # noqa: E731
    elif impl == "torch_learnable_fake_quant":
        zero = torch.zeros(1, device=device())
        step = torch.tensor([0.1], device=device(), requires_grad=True)
        grad_factor = 1.0 / (x.numel() * 15) ** 0.5
        fn = lambda t, s: torch._fake_quantize_learnable_per_tensor_affine(  # noqa: E731
            t, s, zero, 0, 15, grad_factor)
    else:
        fn = ours(impl, lambda t, s: Q.lsq(t, s, 4))
    benchmark(fwd_bwd(fn, x, grad, step))


# --------------------------------------------------------------------------- weights

def composed_dorefa_weight(w, bits):
    n = 2**bits - 1
    t = torch.tanh(w)
    x = t / (2 * t.abs().max()) + 0.5
    return 2 * ste(torch.round(x * n), x * n) / n - 1


def composed_xnor(w):
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return ste(torch.sign(w), w.clamp(-1, 1)) * alpha


@pytest.mark.parametrize("impl", OURS + ("composition",))
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ("dorefa_weight2", "xnor_weight", "syq_weight"))
def test_weight_quantizers(benchmark, impl, shape, op):
    benchmark.group = f"{op} {shape}"
    w = torch.randn(shape, device=device()) * 0.1
    grad = torch.randn_like(w)
    scales = torch.ones(shape[2:], device=device(), requires_grad=True)
    params = ()
    if op == "dorefa_weight2":
        ours_fn, composed = (lambda t: Q.dorefa_weight(t, 2)), (lambda t: composed_dorefa_weight(t, 2))
    elif op == "xnor_weight":
        ours_fn, composed = Q.xnor_weight, composed_xnor
    else:
        params = (scales,)
        ours_fn = lambda t, s: Q.syq_weight(t, s, 0.05)  # noqa: E731
        composed = lambda t, s: ste(torch.sign(t) * (t.abs() > 0.05 * t.abs().max()), t) * s  # noqa: E731
    fn = composed if impl == "composition" else ours(impl, ours_fn)
    benchmark(fwd_bwd(fn, w, grad, *params))
