"""Every quantizer backend against the reference: forward and every gradient, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import expcuda
from expcuda import quant as Q
from expcuda._backends import reference as ref
from expcuda._custom import apply
from expcuda.backends import load
from tests.conftest import backend_device

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACT_SHAPES = ((1,), (13,), (7, 3, 5, 5), (2, 8, 6, 6), (3, 9, 17))
WEIGHT_SHAPES = ((1, 1, 1, 1), (7, 3, 5, 5), (16, 8, 3, 3), (5, 3), (10, 33))
LAYOUTS = ("contiguous", "channels_last", "strided")


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)


def make(shape, dtype, device, layout="contiguous", lo=-1.5, hi=1.5, seed=0):
    """Random values in [lo, hi] plus exact boundaries and rounding ties, in the given layout."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":
        shape = shape[:-1] + (2 * shape[-1],)
    x = torch.rand(shape, generator=gen) * (hi - lo) + lo
    flat = x.view(-1)
    specials = torch.tensor([0.0, 1.0, -1.0, 0.5, 1 / 6, 0.5 / 3, 2.5 / 3, -0.0])
    k = min(flat.numel(), specials.numel())
    flat[:k] = specials[:k]
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[..., ::2]
    return x


def run(backend, fn, *inputs, seed=1):
    """fn's output and the gradients of every input, computed on ``backend``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with expcuda.use_backend(backend):
        out = fn(*leaves)
        gen = torch.Generator().manual_seed(seed)
        upstream = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
        out.backward(upstream)
    return out.detach(), [t.grad for t in leaves]


def check_against_reference(backend, fn, *inputs):
    out, grads = run(backend, fn, *inputs)
    ref_out, ref_grads = run("reference", fn, *inputs)
    exact(out, ref_out)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    for g, rg in zip(grads, ref_grads):
        exact(g, rg)
        assert g.dtype == rg.dtype


# --------------------------------------------------------------------------- activations

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8))
def test_dorefa_activation(backend, dtype, shape, bits):
    x = make(shape, dtype, backend_device(backend), lo=-0.5, hi=1.5)
    check_against_reference(backend, lambda t: Q.dorefa_activation(t, bits), x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_layouts(backend, layout, dtype):
    x = make((2, 5, 3, 7), dtype, backend_device(backend), layout, lo=-0.5, hi=1.5)
    for fn in (lambda t: Q.dorefa_activation(t, 3), Q.sign_activation,
               lambda t: Q.lsq(t, torch.tensor(0.1, device=t.device), 3)):
        check_against_reference(backend, fn, x)


def test_activation_keeps_channels_last(backend):
    x = make((2, 5, 3, 7), torch.float32, backend_device(backend), "channels_last")
    with expcuda.use_backend(backend):
        y = Q.dorefa_activation(x, 2)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_sign_activation(backend, dtype, shape):
    x = make(shape, dtype, backend_device(backend))
    check_against_reference(backend, Q.sign_activation, x)


@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_packed_mask_matches_reference(backend, shape):
    """The saved STE mask itself, not only the gradient it produces."""
    x = make(shape, torch.float32, backend_device(backend), lo=-0.5, hi=1.5)
    kernels = load(backend)
    for fwd in (lambda m, t: m.dorefa_activation_fwd(t, 2), lambda m, t: m.sign_activation_fwd(t)):
        y, mask = fwd(kernels, x)
        ref_y, ref_mask = fwd(ref, x)
        exact(y, ref_y)
        assert mask.dtype == torch.uint8 and mask.shape == ((x.numel() + 7) // 8,)
        assert torch.equal(mask, ref_mask)


def test_mask_packing_layout():
    """Bit j of byte i is storage element 8*i + j: pinned so every backend shares one format."""
    keep = torch.tensor([True, False, True, True, False, False, False, False, True, False])
    packed = ref.pack_mask(keep)
    assert packed.tolist() == [1 + 4 + 8, 1]
    assert torch.equal(ref.unpack_mask(packed, keep), keep)


# --------------------------------------------------------------------------- weights

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8))
def test_dorefa_weight(backend, dtype, shape, bits):
    w = make(shape, dtype, backend_device(backend))
    check_against_reference(backend, lambda t: Q.dorefa_weight(t, bits), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_xnor_weight(backend, dtype, shape):
    w = make(shape, dtype, backend_device(backend))
    check_against_reference(backend, Q.xnor_weight, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ("pixel", "row", "layer"))
@pytest.mark.parametrize("eta", (0.0, 0.05))
@pytest.mark.parametrize("shape", ((7, 3, 5, 5), (16, 8, 3, 3), (1, 1, 1, 1)))
def test_syq_weight(backend, dtype, granularity, eta, shape):
    device = backend_device(backend)
    w = make(shape, dtype, device)
    scale_shape = {"pixel": shape[2:], "row": shape[2:3], "layer": ()}[granularity]
    scales = (torch.rand(scale_shape) + 0.5).to(dtype=dtype, device=device)
    check_against_reference(backend, lambda t, s: Q.syq_weight(t, s, eta, granularity), w, scales)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_layouts(backend, layout):
    w = make((6, 4, 3, 3), torch.float32, backend_device(backend), layout)
    for fn in (lambda t: Q.dorefa_weight(t, 2), lambda t: Q.dorefa_weight(t, 1), Q.xnor_weight):
        check_against_reference(backend, fn, w)


# --------------------------------------------------------------------------- LSQ

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("bits,signed", ((1, False), (2, False), (4, False), (2, True), (3, True), (8, True)))
def test_lsq(backend, dtype, shape, bits, signed):
    device = backend_device(backend)
    x = make(shape, dtype, device, lo=-2, hi=2)
    step = torch.tensor(0.17, dtype=dtype, device=device)
    check_against_reference(backend, lambda t, s: Q.lsq(t, s, bits, signed), x, step)


def test_lsq_step_gradient_matches_formula():
    """The reference's step gradient, written out by hand on a tiny input."""
    x = torch.tensor([0.26, -1.0, 5.0, 0.5])
    s = torch.tensor(0.5, requires_grad=True)
    Q.lsq(x, s, 2).backward(torch.ones(4))
    # x/s = 0.52, -2, 10, 1 with Qn = 0, Qp = 3: r = round(.52)-.52, Qn, Qp, 0
    expected = ((1 - 0.52) + 0 + 3 + 0) / math.sqrt(4 * 3)
    assert s.grad.item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- reference vs autograd

def test_reference_dorefa_weight_matches_autograd():
    """The hand-written backward equals autograd through the tanh / max composition with STE round."""
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    n = 3.0
    t = torch.tanh(w)
    x = t / (2 * t.abs().max()) + 0.5
    r = x * n + (torch.round(x * n) - x * n).detach()
    (2 * r / n - 1).backward(g)
    dw = ref.dorefa_weight_bwd(g.float(), w.detach().float(), 2)
    torch.testing.assert_close(dw.double(), w.grad, atol=1e-5, rtol=1e-4)


def test_reference_xnor_matches_autograd():
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, dtype=torch.float64)
    alpha = w.abs().mean(dim=1, keepdim=True)
    s = torch.sign(w)
    ste = w.clamp(-1, 1) + (s - w.clamp(-1, 1)).detach()
    (ste * alpha).backward(g)
    dw = ref.xnor_weight_bwd(g.float(), w.detach().float())
    torch.testing.assert_close(dw.double(), w.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- NaN, Inf, empty

NONFINITE = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 2.0, -0.7, 0.0, 1.0, 0.6])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_activations(backend, dtype):
    x = NONFINITE.to(dtype=dtype, device=backend_device(backend))
    for fn in (lambda t: Q.dorefa_activation(t, 2), Q.sign_activation,
               lambda t: Q.lsq(t, torch.tensor(0.25, device=t.device), 2, True)):
        check_against_reference(backend, fn, x)


def test_nonfinite_documented_behavior():
    """NaN in: NaN out and a zero STE gradient; Inf clipped like any large value."""
    x = NONFINITE.clone().requires_grad_(True)
    y = Q.dorefa_activation(x, 2)
    y.sum().backward()
    y = y.detach()
    assert math.isnan(y[0]) and y[1] == 1 and y[2] == 0
    assert x.grad[:3].tolist() == [0, 0, 0]
    s = Q.sign_activation(NONFINITE)
    assert s[:3].tolist() == [0, 1, -1]


@pytest.mark.parametrize("shape", ((7, 3, 3, 3), (4, 6)))
def test_nonfinite_weights(backend, shape):
    w = make(shape, torch.float32, backend_device(backend))
    w.view(-1)[3] = float("nan")
    w.view(-1)[5] = float("inf")
    for fn in (lambda t: Q.dorefa_weight(t, 2), lambda t: Q.dorefa_weight(t, 1), Q.xnor_weight):
        check_against_reference(backend, fn, w)


def test_all_zero_dorefa_weight_is_zero():
    w = torch.zeros(3, 2, 3, 3, requires_grad=True)
    out = Q.dorefa_weight(w, 2)
    out.sum().backward()
    assert not out.any() and not w.grad.any()


@pytest.mark.parametrize("fn", (lambda t: Q.dorefa_activation(t, 2), Q.sign_activation,
                                lambda t: Q.dorefa_weight(t, 2), Q.xnor_weight,
                                lambda t: Q.lsq(t, torch.tensor(0.5, device=t.device), 2)))
def test_empty(backend, fn):
    x = torch.empty(0, 3, 2, 2, device=backend_device(backend), requires_grad=True)
    with expcuda.use_backend(backend):
        y = fn(x)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,exc,words", [
    (lambda: Q.dorefa_activation(torch.rand(3), 0), ValueError, "bits"),
    (lambda: Q.dorefa_activation(torch.rand(3), 9), ValueError, "bits"),
    (lambda: Q.dorefa_activation(torch.rand(3), 2.0), TypeError, "bits"),
    (lambda: Q.dorefa_activation(torch.rand(3), True), TypeError, "bits"),
    (lambda: Q.dorefa_weight(torch.rand(3), 32), ValueError, "bits"),
    (lambda: Q.dorefa_activation(torch.arange(3), 2), TypeError, "x must be a float32"),
    (lambda: Q.sign_activation(torch.ones(3, dtype=torch.bool)), TypeError, "x must be"),
    (lambda: Q.dorefa_weight([1.0, 2.0], 2), TypeError, "w must be a torch.Tensor"),
    (lambda: Q.xnor_weight(torch.rand(3, 3, 3)), ValueError, "w must have rank 2 or 4"),
    (lambda: Q.syq_weight(torch.rand(4, 2, 3, 3), torch.ones(3)), ValueError, "scales must have shape (3, 3)"),
    (lambda: Q.syq_weight(torch.rand(4, 2, 3, 3), torch.ones(3, 3), granularity="row"), ValueError, "scales"),
    (lambda: Q.syq_weight(torch.rand(4, 2, 3, 3), torch.ones(()), granularity="chan"), ValueError, "granularity"),
    (lambda: Q.syq_weight(torch.rand(4, 2, 3, 3), torch.ones(3, 3), eta=1.5), ValueError, "eta"),
    (lambda: Q.syq_weight(torch.rand(4, 2), torch.ones(3)), ValueError, "rank"),
    (lambda: Q.lsq(torch.rand(3), torch.tensor(0.0), 2), ValueError, "step must be a positive scalar"),
    (lambda: Q.lsq(torch.rand(3), torch.tensor(float("nan")), 2), ValueError, "step must be a positive"),
    (lambda: Q.lsq(torch.rand(3), torch.ones(2), 2), ValueError, "step must be a positive scalar"),
    (lambda: Q.lsq(torch.rand(3), torch.tensor(1), 2), TypeError, "step must be a float32"),
    (lambda: Q.lsq(torch.rand(3), torch.tensor(0.5), 1, signed=True), ValueError, "bits"),
    (lambda: Q.lsq(torch.rand(3), torch.tensor(0.5, device="meta"), 2), ValueError, "one device"),
    (lambda: Q.syq_weight(torch.rand(4, 2, 3, 3), torch.ones(3, 3, device="meta")), ValueError, "one device"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


# --------------------------------------------------------------------------- backend choice

def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with expcuda.use_backend("tpu"):
            pass


def test_forced_backend_that_cannot_serve_says_why(monkeypatch):
    monkeypatch.setenv("EXPCUDA_BACKEND", "cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda can serve CUDA tensors, test the CPU-tensor refusal below")
    with pytest.raises(expcuda.BackendError, match="backend 'cuda' was forced"):
        Q.dorefa_activation(torch.rand(4), 2)


def test_forced_cuda_refuses_cpu_tensors():
    from expcuda.backends import why_not
    assert why_not("cuda", torch.device("cpu"), torch.float32) is not None


def test_env_var_forces_reference(monkeypatch):
    monkeypatch.setenv("EXPCUDA_BACKEND", "reference")
    from expcuda.registry import dispatch
    assert dispatch("lsq_fwd", torch.empty(1)).backend == "reference"


def test_context_manager_overrides_env(monkeypatch):
    monkeypatch.setenv("EXPCUDA_BACKEND", "cuda")
    from expcuda.registry import dispatch
    with expcuda.use_backend("reference"):
        assert dispatch("lsq_fwd", torch.empty(1)).backend == "reference"


# --------------------------------------------------------------------------- torch.library integration

OPCHECK_CASES = [
    ("dorefa_activation", lambda: (torch.rand(3, 4, 5) * 2 - 0.5, 2)),
    ("sign_activation", lambda: (torch.randn(3, 4, 5),)),
    ("dorefa_weight", lambda: (torch.randn(4, 3, 3, 3), 2)),
    ("dorefa_weight", lambda: (torch.randn(4, 3, 3, 3), 1)),
    ("xnor_weight", lambda: (torch.randn(4, 3, 3, 3),)),
    ("syq_weight", lambda: (torch.randn(4, 3, 3, 3), torch.rand(3, 3) + 0.5, 0.05, "pixel")),
    ("lsq", lambda: (torch.randn(3, 4, 5), torch.tensor(0.2), 3, True)),
]


@pytest.mark.parametrize("name,args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(name, args):
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args())
    torch.library.opcheck(getattr(torch.ops.expcuda, name).default, args)


def test_torch_compile_fullgraph():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.conv2 = torch.nn.Conv2d(4, 2, 3)
            self.step = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x):
            y = torch.nn.functional.conv2d(Q.dorefa_activation(x, 2), Q.dorefa_weight(self.conv.weight, 2))
            y = Q.lsq(y, self.step, 3) + Q.sign_activation(y)
            return torch.nn.functional.conv2d(y, Q.xnor_weight(self.conv2.weight))

    net = Net()
    x = torch.rand(2, 3, 8, 8)
    eager = net(x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    out.sum().backward()
    assert net.step.grad is not None and net.conv.weight.grad.abs().sum() > 0


def _custom_op(name: str):
    """The custom op object ``<name>_op`` of the quantizer module that defines it."""
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules(expcuda.quant.kinds.__path__):
        module = importlib.import_module(f"expcuda.quant.kinds.{m.name}")
        if hasattr(module, f"{name}_op"):
            return getattr(module, f"{name}_op")
    raise LookupError(name)


@pytest.mark.parametrize("name,args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_custom_op_autograd_equals_eager_path(name, args):
    """Eager calls run the op's body under an autograd.Function; the registered op must agree."""
    args = args()
    op = getattr(torch.ops.expcuda, name).default
    grads = []
    for via_op in (True, False):
        leaves = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a
                       for a in args)
        out = op(*leaves) if via_op else apply(_custom_op(name), *leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append((out.detach(), [a.grad for a in leaves if isinstance(a, torch.Tensor)]))
    (out_op, g_op), (out_eager, g_eager) = grads
    exact(out_op, out_eager)
    for a, b in zip(g_op, g_eager):
        exact(a, b)
