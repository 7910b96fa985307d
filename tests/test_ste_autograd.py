"""The eager fast path of the activation quantizers: one C++ autograd op, the same bits as the
Python custom op (``csrc/cpu/ste_autograd.cpp``)."""

from __future__ import annotations

import pytest
import torch

import expcuda
from expcuda import _ext
from expcuda import quant as Q
from expcuda._custom import apply
from expcuda.quant.kinds import dorefa, sign

pytestmark = pytest.mark.skipif(not _ext.has_kernel("dorefa_activation_ste", "CompositeImplicitAutograd"),
                                reason="expcuda._C was built without csrc/cpu/ste_autograd.cpp")

CASES = {
    "dorefa2": (lambda x: Q.dorefa_activation(x, 2), lambda x: apply(dorefa.dorefa_activation_op, x, 2)[0]),
    "dorefa1": (lambda x: Q.dorefa_activation(x, 1), lambda x: apply(dorefa.dorefa_activation_op, x, 1)[0]),
    "dorefa8": (lambda x: Q.dorefa_activation(x, 8), lambda x: apply(dorefa.dorefa_activation_op, x, 8)[0]),
    "sign": (Q.sign_activation, lambda x: apply(sign.sign_activation_op, x)[0]),
}


def _inputs(layout, dtype):
    x = torch.rand(3, 5, 7, 9) * 2 - 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2, 1:]  # not dense: the op takes a contiguous copy
    elif layout == "empty":
        x = x[:0]
    return x.to(dtype)


def _run(fn, x, grad_layout):
    leaf = x.detach().clone().requires_grad_(True)
    y = fn(leaf)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    if grad_layout == "channels_last" and g.dim() == 4:
        g = g.contiguous(memory_format=torch.channels_last)
    y.backward(g)
    return y, leaf.grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "empty"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_the_fast_path_equals_the_custom_op(case, dtype, layout, grad_layout):
    fast, slow = CASES[case]
    x = _inputs(layout, dtype)
    y_fast, g_fast = _run(fast, x, grad_layout)
    y_slow, g_slow = _run(slow, x, grad_layout)
    if y_fast.grad_fn is not None:  # it did take the C++ autograd op (an empty input too)
        assert "ActivationSte>" in y_fast.grad_fn.name(), y_fast.grad_fn.name()
    for a, b in ((y_fast, y_slow), (g_fast, g_slow)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_no_grad_and_inference_mode(case):
    fast, slow = CASES[case]
    x = _inputs("contiguous", torch.float32)
    with torch.no_grad():
        a = fast(x)
    with torch.inference_mode():
        b = fast(x)
    torch.testing.assert_close(a, slow(x).detach(), atol=0, rtol=0)
    torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_a_forced_or_replaced_kernel_is_honoured():
    """The fast path only stands in for the compiled kernel the dispatcher would run."""
    x = _inputs("contiguous", torch.float32).requires_grad_(True)
    with expcuda.use_backend("reference"):
        assert "ActivationSte>" not in Q.dorefa_activation(x, 2).grad_fn.name()
    from expcuda import registry
    broken = lambda x, bits: (_ for _ in ()).throw(RuntimeError("broken kernel"))  # noqa: E731
    with registry.replaced("dorefa_activation_fwd", "cpu", broken):
        with pytest.raises(RuntimeError, match="broken kernel"):
            Q.dorefa_activation(x, 2)


class _Recording(torch.Tensor):
    """A Tensor subclass that records the functions __torch_function__ sees."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_plain_tensors_take_the_binding_and_subclasses_torch_ops():
    """A plain Tensor calls the pybind11 function of expcuda._C (no torch.ops Python around it); a
    subclass calls torch.ops.expcuda_C, whose __torch_function__ handling the binding lacks."""
    from expcuda.quant.ops import compiled_autograd

    x = _inputs("contiguous", torch.float32)
    assert compiled_autograd("dorefa_activation_fwd", "dorefa_activation_ste", x) is _ext._C.dorefa_activation_ste
    assert compiled_autograd("sign_activation_fwd", "sign_activation_ste", x) is _ext._C.sign_activation_ste
    sub = x.as_subclass(_Recording)
    _Recording.seen.clear()
    y = Q.dorefa_activation(sub, 2)
    assert any("dorefa_activation_ste" in name for name in _Recording.seen), _Recording.seen
    torch.testing.assert_close(y.as_subclass(torch.Tensor), Q.dorefa_activation(x, 2), atol=0, rtol=0)
