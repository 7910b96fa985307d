"""LSQ (learned step size): ``round(clip(x / s, Qn, Qp)) * s``, for weights (signed) and activations."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from expcuda import _checks
from expcuda._custom import apply, autograd, call, define
from expcuda.quant import spec
from expcuda.quant.ops import LIB, as_layout, dense, empty_dense_like, kernel
from expcuda.quant.reference import F32, _sum64, div

spec.kernels(
    lsq_fwd="LSQ: (x, step, bits, signed) -> Qa(x)",
    lsq_bwd="LSQ's gradient: (grad, x, step, bits, signed) -> (dx, dstep)",
)


# --------------------------------------------------------------------------- the reference

def lsq_range(bits: int, signed: bool) -> tuple[float, float]:
    if signed:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


@spec.reference
def lsq_fwd(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    qn, qp = lsq_range(bits, signed)
    s = step.to(F32).reshape(())
    v = x.to(F32) / s
    return (torch.round(torch.clamp(v, qn, qp)) * s).to(x.dtype)


@spec.reference
def lsq_bwd(grad: Tensor, x: Tensor, step: Tensor, bits: int,
            signed: bool) -> tuple[Tensor, Tensor]:
    qn, qp = lsq_range(bits, signed)
    s = step.to(F32).reshape(())
    g = grad.to(F32)
    v = x.to(F32) / s
    inside = (v >= qn) & (v <= qp)
    zero = torch.zeros((), dtype=F32)
    dx = torch.where(inside, g, zero).to(x.dtype)
    r = torch.where(inside, torch.round(v) - v, torch.where(v < qn, qn, qp))
    total = _sum64(g * r)
    ds = div(total, math.sqrt(x.numel() * qp)).to(F32)
    return dx, ds.to(step.dtype).view_as(step)


# --------------------------------------------------------------------------- the ops (LSQ saves its input:
# the step's gradient needs round(x/s) - x/s everywhere)

def _lsq_op_impl(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return kernel("lsq_fwd", x)(x, step, bits, signed)


lsq_op = define(f"{LIB}::lsq", _lsq_op_impl)


@lsq_op.register_fake
def _(x, step, bits, signed):
    return empty_dense_like(x)


def _lsq_backward_impl(grad: Tensor, x: Tensor, step: Tensor, bits: int,
                       signed: bool) -> tuple[Tensor, Tensor]:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(step)
    return kernel("lsq_bwd", x)(as_layout(grad, x.stride()), x, step, bits, signed)


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


@spec.public
def lsq(x: Tensor, step: Tensor, bits: int, signed: bool = False) -> Tensor:
    """LSQ: ``round(clip(x / s, Qn, Qp)) * s`` with a learned positive scalar step ``s``."""
    _checks.float_tensor("x", x)
    _checks.float_tensor("step", step)
    _checks.integer("bits", bits, 2 if signed else 1, 8)
    _checks.same_device(x=x, step=step)
    if step.numel() != 1:
        raise ValueError(f"step must be a positive scalar tensor, got shape {tuple(step.shape)}")
    if step.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(step.detach() > 0):
        raise ValueError(f"step must be a positive scalar tensor, got {step.item()}")
    return apply(lsq_op, x, step, bits, bool(signed))


# --------------------------------------------------------------------------- nn and the self-check

def _setup(m, kernel_size, eta, granularity) -> None:
    m.step = nn.Parameter(torch.ones(()))


def _init_from(m, mean_abs) -> None:
    m.step.fill_(2 * mean_abs / math.sqrt(2 ** (m.bits - 1) - 1))  # the LSQ paper's initial step


spec.weight_kind(name="lsq", order=3, bits=(2, 8),  # signed LSQ needs at least 2 bits
                 forward=lambda m, w: lsq(w, m.step.to(w.dtype), m.bits, signed=True),
                 setup=_setup, init_from=_init_from)


def _lsq_inputs(dtype, device):
    return spec.sample((2, 5, 3, 7), dtype, device, lo=-2, hi=2), torch.tensor(0.17, dtype=dtype, device=device)


spec.selftest("lsq", [(f"bits={b} signed={s}", (lambda b, s: lambda x, st: lsq(x, st, b, s))(b, s), _lsq_inputs)
                      for b, s in ((2, False), (4, False), (2, True), (4, True))])
