"""XNOR-Net weights: ``sign(w)`` times each output filter's ``mean|w|``, with its exact gradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from expcuda import _checks
from expcuda._custom import apply, autograd, call, define
from expcuda.quant import spec
from expcuda.quant.ops import LIB, empty_weight_like, weight_backward, weight_forward
from expcuda.quant.reference import F32, _sum64, div, sign

spec.kernels(
    xnor_weight_fwd="XNOR weights: (w) -> sign(w) * alpha per filter",
    xnor_weight_bwd="XNOR weights' gradient: (grad, w) -> dw",
)


# --------------------------------------------------------------------------- the reference

def _filter_dims(w: Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def _xnor_alpha(wf: Tensor) -> Tensor:
    dims = _filter_dims(wf)
    n = math.prod(wf.shape[1:])
    return div(_sum64(wf.abs(), dims), n).to(F32).view(-1, *([1] * len(dims)))


@spec.reference
def xnor_weight_fwd(w: Tensor) -> Tensor:
    wf = w.to(F32)
    return (sign(wf) * _xnor_alpha(wf)).to(w.dtype)


@spec.reference
def xnor_weight_bwd(grad: Tensor, w: Tensor) -> Tensor:
    wf, g = w.to(F32), grad.to(F32)
    dims = _filter_dims(wf)
    n = math.prod(wf.shape[1:])
    s = sign(wf)
    alpha = _xnor_alpha(wf)
    t = div(_sum64(s * g, dims), n).to(F32).view_as(alpha)
    direct = torch.where(wf.abs() <= 1, alpha * g, torch.zeros((), dtype=F32))
    return (direct + s * t).to(w.dtype)


# --------------------------------------------------------------------------- the ops

def _xnor_weight_op_impl(w: Tensor) -> Tensor:
    return weight_forward("xnor_weight_fwd", w)


xnor_weight_op = define(f"{LIB}::xnor_weight", _xnor_weight_op_impl)


@xnor_weight_op.register_fake
def _(w):
    return empty_weight_like(w)


def _xnor_weight_backward_impl(grad: Tensor, w: Tensor) -> Tensor:
    return weight_backward("xnor_weight_bwd", grad, w)


xnor_weight_backward = define(f"{LIB}::xnor_weight_backward", _xnor_weight_backward_impl)


@xnor_weight_backward.register_fake
def _(grad, w):
    return empty_weight_like(w)


def _xnor_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _xnor_grad(ctx, grad):
    (w,) = ctx.saved_tensors
    return call(ctx, xnor_weight_backward, grad, w)


autograd(xnor_weight_op, _xnor_grad, _xnor_setup)


@spec.public
def xnor_weight(w: Tensor) -> Tensor:
    """XNOR-Net weights: ``sign(w)`` times each output filter's ``mean|w|``."""
    _checks.float_tensor("w", w)
    _checks.rank("w", w, (2, 4), "(out, in) or (out, in, kh, kw): the scale is per output filter")
    return apply(xnor_weight_op, w)


# --------------------------------------------------------------------------- nn and the self-check

spec.weight_kind(name="xnor", order=1, bits=None, binary_why="XNOR weights are binary",
                 forward=lambda m, w: xnor_weight(w))
spec.selftest("xnor_weight", [
    ("conv", xnor_weight, lambda dt, dev: (spec.sample((6, 3, 3, 3), dt, dev),)),
    ("linear", xnor_weight, lambda dt, dev: (spec.sample((5, 7), dt, dev),)),
])
