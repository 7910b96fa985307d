"""The quantizers as ``torch.library`` custom ops with fake kernels and autograd.

Each custom op calls its kernel entry points (``KERNELS`` below, declared in
:mod:`expcuda.registry`) through the one dispatcher, which picks a backend's
kernel for the inputs; the reference kernels are ``expcuda.quant.reference``.  Activation quantizers (DoReFa, sign) save their straight-through
mask packed 8 elements per byte: forward writes it beside the output, and
backward reads 1/32 of a float32 tensor instead of the whole saved input
(see the README for the measurement).  Weight quantizers save the weight
(small, and their backward needs it for more than a mask).  LSQ saves its
input, since the step's gradient needs ``round(x/s) - x/s`` everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from expcuda import registry
from expcuda._custom import autograd, call, define

LIB = "expcuda"


def dense(x: Tensor) -> Tensor:
    """x itself if its storage is a dense block (any layout), else a contiguous copy."""
    if x.is_contiguous() or is_non_overlapping_and_dense(x):  # the first test is the cheap one
        return x
    return x.contiguous()


def empty_dense_like(x: Tensor, dtype=None) -> Tensor:
    if is_non_overlapping_and_dense(x):
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


def mask_like(x: Tensor) -> Tensor:
    return torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8, device=x.device)


def as_layout(grad: Tensor, like_stride) -> Tensor:
    """grad with the strides of the forward output, so kernels can walk storage in step."""
    if grad.stride() == tuple(like_stride):
        return grad
    out = torch.empty_strided(grad.shape, like_stride, dtype=grad.dtype, device=grad.device)
    return out.copy_(grad)


#: the kernel entry points every backend may serve, with the same signature everywhere
KERNELS = {
    "dorefa_activation_fwd": "DoReFa activation: (x, bits) -> (y, packed STE mask)",
    "sign_activation_fwd": "sign activation: (x) -> (y, packed hardtanh STE mask)",
    "mask_bwd": "STE backward from a packed mask: (grad, mask) -> dx",
    "dorefa_weight_fwd": "DoReFa weights: (w, bits) -> Qw(w)",
    "dorefa_weight_bwd": "DoReFa weights' gradient: (grad, w, bits) -> dw",
    "xnor_weight_fwd": "XNOR weights: (w) -> sign(w) * alpha per filter",
    "xnor_weight_bwd": "XNOR weights' gradient: (grad, w) -> dw",
    "syq_weight_fwd": "SYQ weights: (w, scales, eta, granularity) -> Qw(w)",
    "syq_weight_bwd": "SYQ weights' gradient: (grad, w, scales, eta, granularity) -> (dw, dscales)",
    "lsq_fwd": "LSQ: (x, step, bits, signed) -> Qa(x)",
    "lsq_bwd": "LSQ's gradient: (grad, x, step, bits, signed) -> (dx, dstep)",
}
for _name, _doc in KERNELS.items():
    registry.declare(_name, _doc)


def _kernel(op: str, t: Tensor):
    """The kernel function the dispatcher picks for ``op`` on tensors like ``t``."""
    return registry.dispatch(op, t).fn


# --------------------------------------------------------------------------- packed-mask STE backward

def _ste_mask_backward_impl(grad: Tensor, mask: Tensor) -> Tensor:
    if grad.numel() == 0:
        return torch.empty_like(grad)
    return _kernel("mask_bwd", grad)(grad, mask)


ste_mask_backward = define(f"{LIB}::ste_mask_backward", _ste_mask_backward_impl)


@ste_mask_backward.register_fake
def _(grad, mask):
    return torch.empty_like(grad)


def _masked_setup(ctx, inputs, output):
    y, mask = output
    ctx.save_for_backward(mask)
    ctx.out_stride = y.stride()
    ctx.n_inputs = len(inputs)


def _masked_backward(ctx, grad_y, grad_mask):
    (mask,) = ctx.saved_tensors
    grad_x = call(ctx, ste_mask_backward, as_layout(grad_y, ctx.out_stride), mask)
    return (grad_x,) + (None,) * (ctx.n_inputs - 1)


# --------------------------------------------------------------------------- DoReFa activations

def _dorefa_activation_op_impl(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), mask_like(x)
    return _kernel("dorefa_activation_fwd", x)(x, bits)


dorefa_activation_op = define(f"{LIB}::dorefa_activation", _dorefa_activation_op_impl)


@dorefa_activation_op.register_fake
def _(x, bits):
    return empty_dense_like(x), mask_like(x)


autograd(dorefa_activation_op, _masked_backward, _masked_setup)


# --------------------------------------------------------------------------- sign activations

def _sign_activation_op_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), mask_like(x)
    return _kernel("sign_activation_fwd", x)(x)


sign_activation_op = define(f"{LIB}::sign_activation", _sign_activation_op_impl)


@sign_activation_op.register_fake
def _(x):
    return empty_dense_like(x), mask_like(x)


autograd(sign_activation_op, _masked_backward, _masked_setup)


# --------------------------------------------------------------------------- DoReFa weights

def _dorefa_weight_op_impl(w: Tensor, bits: int) -> Tensor:
    w = w.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return _kernel("dorefa_weight_fwd", w)(w, bits)


dorefa_weight_op = define(f"{LIB}::dorefa_weight", _dorefa_weight_op_impl)


@dorefa_weight_op.register_fake
def _(w, bits):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _dorefa_weight_backward_impl(grad: Tensor, w: Tensor, bits: int) -> Tensor:
    grad, w = grad.contiguous(), w.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return _kernel("dorefa_weight_bwd", w)(grad, w, bits)


dorefa_weight_backward = define(f"{LIB}::dorefa_weight_backward", _dorefa_weight_backward_impl)


@dorefa_weight_backward.register_fake
def _(grad, w, bits):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _dorefa_weight_setup(ctx, inputs, output):
    w, bits = inputs
    ctx.save_for_backward(w)
    ctx.bits = bits


def _dorefa_weight_grad(ctx, grad):
    (w,) = ctx.saved_tensors
    return call(ctx, dorefa_weight_backward, grad, w, ctx.bits), None


autograd(dorefa_weight_op, _dorefa_weight_grad, _dorefa_weight_setup)


# --------------------------------------------------------------------------- XNOR weights

def _xnor_weight_op_impl(w: Tensor) -> Tensor:
    w = w.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return _kernel("xnor_weight_fwd", w)(w)


xnor_weight_op = define(f"{LIB}::xnor_weight", _xnor_weight_op_impl)


@xnor_weight_op.register_fake
def _(w):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _xnor_weight_backward_impl(grad: Tensor, w: Tensor) -> Tensor:
    grad, w = grad.contiguous(), w.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return _kernel("xnor_weight_bwd", w)(grad, w)


xnor_weight_backward = define(f"{LIB}::xnor_weight_backward", _xnor_weight_backward_impl)


@xnor_weight_backward.register_fake
def _(grad, w):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _xnor_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _xnor_grad(ctx, grad):
    (w,) = ctx.saved_tensors
    return call(ctx, xnor_weight_backward, grad, w)


autograd(xnor_weight_op, _xnor_grad, _xnor_setup)


# --------------------------------------------------------------------------- SYQ weights

def _syq_weight_op_impl(w: Tensor, scales: Tensor, eta: float, granularity: str) -> Tensor:
    w, scales = w.contiguous(), scales.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return _kernel("syq_weight_fwd", w)(w, scales, eta, granularity)


syq_weight_op = define(f"{LIB}::syq_weight", _syq_weight_op_impl)


@syq_weight_op.register_fake
def _(w, scales, eta, granularity):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _syq_weight_backward_impl(grad: Tensor, w: Tensor, scales: Tensor, eta: float,
                        granularity: str) -> tuple[Tensor, Tensor]:
    grad, w, scales = grad.contiguous(), w.contiguous(), scales.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w), torch.zeros_like(scales)
    return _kernel("syq_weight_bwd", w)(grad, w, scales, eta, granularity)


syq_weight_backward = define(f"{LIB}::syq_weight_backward", _syq_weight_backward_impl)


@syq_weight_backward.register_fake
def _(grad, w, scales, eta, granularity):
    return (torch.empty(w.shape, dtype=w.dtype, device=w.device),
            torch.empty(scales.shape, dtype=scales.dtype, device=scales.device))


def _syq_setup(ctx, inputs, output):
    w, scales, eta, granularity = inputs
    ctx.save_for_backward(w, scales)
    ctx.eta, ctx.granularity = eta, granularity


def _syq_grad(ctx, grad):
    w, scales = ctx.saved_tensors
    dw, ds = call(ctx, syq_weight_backward, grad, w, scales, ctx.eta, ctx.granularity)
    return dw, ds, None, None


autograd(syq_weight_op, _syq_grad, _syq_setup)


# --------------------------------------------------------------------------- LSQ

def _lsq_op_impl(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _kernel("lsq_fwd", x)(x, step, bits, signed)


lsq_op = define(f"{LIB}::lsq", _lsq_op_impl)


@lsq_op.register_fake
def _(x, step, bits, signed):
    return empty_dense_like(x)


def _lsq_backward_impl(grad: Tensor, x: Tensor, step: Tensor, bits: int,
                 signed: bool) -> tuple[Tensor, Tensor]:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(step)
    return _kernel("lsq_bwd", x)(as_layout(grad, x.stride()), x, step, bits, signed)


lsq_backward = define(f"{LIB}::lsq_backward", _lsq_backward_impl)


@lsq_backward.register_fake
def _(grad, x, step, bits, signed):
    return empty_dense_like(x), torch.empty_like(step)


def _lsq_setup(ctx, inputs, output):
    x, step, bits, signed = inputs
    ctx.save_for_backward(dense(x), step)
    ctx.bits, ctx.signed = bits, signed


def _lsq_grad(ctx, grad):
    x, step = ctx.saved_tensors
    dx, ds = call(ctx, lsq_backward, grad, x, step, ctx.bits, ctx.signed)
    return dx, ds, None, None


autograd(lsq_op, _lsq_grad, _lsq_setup)
