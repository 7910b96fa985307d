"""DoReFa-Net's quantizers: k-bit activations and weights (METHODS.md), with their STE backward."""

from __future__ import annotations

import torch
from torch import Tensor

from expcuda import _checks
from expcuda._custom import apply, autograd, call, define
from expcuda.quant import spec
from expcuda.quant.ops import (LIB, compiled_autograd, empty_dense_like, empty_weight_like, mask_like,
                                 masked_backward, masked_forward, masked_setup, weight_backward, weight_forward)
from expcuda.quant.reference import F32, F64, _sum64, div, levels, pack_mask, sign

spec.kernels(
    dorefa_activation_fwd="DoReFa activation: (x, bits) -> (y, packed STE mask)",
    dorefa_weight_fwd="DoReFa weights: (w, bits) -> Qw(w)",
    dorefa_weight_bwd="DoReFa weights' gradient: (grad, w, bits) -> dw",
)


# --------------------------------------------------------------------------- the reference

@spec.reference
def dorefa_activation_fwd(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    xf = x.to(F32)
    if bits == 32:
        return x.clone(), pack_mask(torch.ones_like(x, dtype=torch.bool))
    n = levels(bits)
    y = div(torch.round(torch.clamp(xf, 0.0, 1.0) * n), n)
    return y.to(x.dtype), pack_mask((xf >= 0) & (xf <= 1))


@spec.reference
def dorefa_weight_fwd(w: Tensor, bits: int) -> Tensor:
    wf = w.to(F32)
    if bits == 1:
        e = div(_sum64(wf.abs()), wf.numel()).to(F32)
        return (sign(wf) * e).to(w.dtype)
    t = torch.tanh(wf)
    m = t.abs().amax()
    if m == 0:
        return torch.zeros_like(w)
    n = levels(bits)
    d = 2 * m
    x = t / d + 0.5
    r = torch.round(x * n)
    return (div(2 * r, n) - 1).to(w.dtype)


@spec.reference
def dorefa_weight_bwd(grad: Tensor, w: Tensor, bits: int) -> Tensor:
    g = grad.to(F32)
    if bits == 1:
        return g.to(w.dtype, copy=True)
    t = torch.tanh(w.to(F32))
    m = t.abs().amax()
    if m == 0:
        return torch.zeros_like(w)
    d = 2 * m
    g2 = 2 * g
    q = t / d
    # d(loss)/d(max|t|), shared evenly by the elements that attain the max
    s = _sum64(g2 * q)
    ties = t.abs() == m
    share = (-2.0 * s / d.to(F64) / ties.sum().to(F64)).to(F32)
    dt = g2 / d + torch.where(ties, sign(t) * share, torch.zeros((), dtype=F32))
    return (dt * (1 - t * t)).to(w.dtype)


# --------------------------------------------------------------------------- activations: the op

def _dorefa_activation_op_impl(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return masked_forward("dorefa_activation_fwd", x, bits)


dorefa_activation_op = define(f"{LIB}::dorefa_activation", _dorefa_activation_op_impl)


@dorefa_activation_op.register_fake
def _(x, bits):
    return empty_dense_like(x), mask_like(x)


autograd(dorefa_activation_op, masked_backward, masked_setup)


@spec.public
def dorefa_activation(x: Tensor, bits: int) -> Tensor:
    """DoReFa activations: ``round(n * clip(x, 0, 1)) / n``; ``bits=32`` returns ``x``."""
    _checks.float_tensor("x", x)
    _checks.integer("bits", bits, 1, 8, extra=(32,))
    if bits == 32:
        return x
    if not torch.compiler.is_compiling():
        fast = compiled_autograd("dorefa_activation_fwd", "dorefa_activation_ste", x)
        if fast is not None:
            return fast(x, bits)
    return apply(dorefa_activation_op, x, bits)[0]


# --------------------------------------------------------------------------- weights: the ops

def _dorefa_weight_op_impl(w: Tensor, bits: int) -> Tensor:
    return weight_forward("dorefa_weight_fwd", w, bits)


dorefa_weight_op = define(f"{LIB}::dorefa_weight", _dorefa_weight_op_impl)


@dorefa_weight_op.register_fake
def _(w, bits):
    return empty_weight_like(w)


def _dorefa_weight_backward_impl(grad: Tensor, w: Tensor, bits: int) -> Tensor:
    return weight_backward("dorefa_weight_bwd", grad, w, bits)


dorefa_weight_backward = define(f"{LIB}::dorefa_weight_backward", _dorefa_weight_backward_impl)


@dorefa_weight_backward.register_fake
def _(grad, w, bits):
    return empty_weight_like(w)


def _dorefa_weight_setup(ctx, inputs, output):
    w, bits = inputs
    ctx.save_for_backward(w)
    ctx.bits = bits


def _dorefa_weight_grad(ctx, grad):
    (w,) = ctx.saved_tensors
    return call(ctx, dorefa_weight_backward, grad, w, ctx.bits), None


autograd(dorefa_weight_op, _dorefa_weight_grad, _dorefa_weight_setup)


@spec.public
def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights: the tanh form for ``bits >= 2``, ``sign(w) * mean|w|`` for 1."""
    _checks.float_tensor("w", w)
    _checks.integer("bits", bits, 1, 8)
    return apply(dorefa_weight_op, w, bits)


# --------------------------------------------------------------------------- nn and the self-check

spec.weight_kind(name="dorefa", order=0, bits=(1, 8), forward=lambda m, w: dorefa_weight(w, m.bits))


def _act(channels_last=False):
    return lambda dtype, device: (spec.sample((2, 5, 3, 7), dtype, device, lo=-0.5, hi=1.5,
                                              channels_last=channels_last),)


def _weight(shape):
    return lambda dtype, device: (spec.sample(shape, dtype, device),)


spec.selftest("dorefa_activation",
              [(f"bits={b}", (lambda b: lambda t: dorefa_activation(t, b))(b), _act()) for b in (1, 2, 4, 8)]
              + [("bits=2 channels_last", lambda t: dorefa_activation(t, 2), _act(channels_last=True))])
spec.selftest("dorefa_weight",
              [(f"bits={b} {kind}", (lambda b: lambda t: dorefa_weight(t, b))(b), _weight(shape))
               for b in (1, 2, 4) for kind, shape in (("conv", (6, 3, 3, 3)), ("linear", (5, 7)))])
