"""The fused epilogue of the expanded block as a ``torch.library`` custom op.

The fused path convolves once with the LP and FP weights stacked along the
output channels, then this op does everything after the convolution in one
go: BatchNorm with batch statistics over all stacked channels, ``phi`` and
``Qa`` on the LP channels, ``psi`` and the factor ``f`` on the FP channels,
and the combine of scheme 1 or 2; its backward is the matching STE formula.
It saves only the convolution output (which BatchNorm's backward needs
anyway) and the per-channel statistics, and recomputes everything else.

Channels ``[0, c_lp)`` of ``z`` are the LP branch and ``[c_lp, C)`` the FP
branch (``C == c_lp`` leaves only the LP branch: the folded block and the
plain low-precision block).  Kernels: the C++ CPU kernel
(``csrc/cpu/block_cpu.cpp``) when ``expcuda._C`` has it, the CUDA kernel
(``csrc/cuda/block_cuda.cu``) when the backend dispatcher picks ``cuda`` and
``expcuda._C`` was built with it, Triton (``_backends/triton_epilogue.py``) when it
picks Triton (or ``cuda`` without the CUDA kernel), and
:func:`epilogue_fwd_torch` / :func:`epilogue_bwd_torch` otherwise: the backends register
them in :mod:`expcuda.registry`, whose dispatcher picks (this module imports no kernel).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from expcuda import registry
from expcuda._custom import apply, autograd, call, define
from expcuda.quant.reference import div

F32 = torch.float32
from expcuda.codes import A_QUANT_CODES, COMBINES, PHI_CODES  # noqa: E402,F401  (the kernels' codes)


def out_channels(c_total: int, c_lp: int, combine: str) -> int:
    return c_total if combine == "concat" else c_lp


# --------------------------------------------------------------------------- pure-PyTorch kernels

def _bc(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _phi(kind: str, y: Tensor) -> Tensor:
    if kind == "relu":
        return torch.relu(y)
    if kind == "clip":
        return torch.clamp(y, 0.0, 1.0)
    return y


def _phi_mask(kind: str, y: Tensor) -> Optional[Tensor]:
    if kind == "relu":
        return y > 0
    if kind == "clip":
        return (y >= 0) & (y <= 1)
    return None


def _qa(a_quant: str, a_bits: int, u: Tensor, step: Optional[Tensor]) -> Tensor:
    """Qa forward, the same float32 formulas as ``expcuda.quant.reference``."""
    if a_quant == "dorefa":
        c = torch.clamp(u, 0.0, 1.0)
        if a_bits == 32:
            return c
        n = float(2**a_bits - 1)
        return div(torch.round(c * n), n)  # IEEE on CUDA too (see reference.div)
    if a_quant == "sign":
        return (u > 0).to(F32) - (u < 0).to(F32)
    if a_quant == "lsq":
        s = step.to(F32).reshape(())
        return torch.round(torch.clamp(u / s, 0.0, float(2**a_bits - 1))) * s
    return u


def _qa_backward(a_quant: str, a_bits: int, u: Tensor, g: Tensor,
                 step: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Qa's STE: (du, dstep)."""
    if a_quant == "dorefa":
        return torch.where((u >= 0) & (u <= 1), g, 0.0), None
    if a_quant == "sign":
        return torch.where(u.abs() <= 1, g, 0.0), None
    if a_quant == "lsq":
        qp = float(2**a_bits - 1)
        s = step.to(F32).reshape(())
        v = u / s
        inside = (v >= 0) & (v <= qp)
        r = torch.where(inside, torch.round(v) - v, torch.where(v < 0, 0.0, qp))
        ds = div((g * r).to(torch.float64).sum(), math.sqrt(u.numel() * qp)).to(F32)
        return torch.where(inside, g, 0.0), ds
    return g, None


def _combine(combine: str, a: Tensor, b: Tensor) -> Tensor:
    if combine == "concat":
        return torch.cat([a, b], dim=1)
    return a + b if combine == "add" else a - b


def invstd(var: Tensor, eps: float) -> Tensor:
    """BatchNorm's 1 / sqrt(var + eps) as every epilogue kernel defines it: the IEEE square root,
    then the IEEE division (the CUDA kernel's ``1.f / sqrtf``); one ulp of invstd can move a
    value across a quantization level.  ATen reaches it differently per device: on CUDA
    ``torch.rsqrt`` is approximate (about 2 ulp) while ``sqrt`` and ``reciprocal`` are IEEE; on
    the CPU ``torch.rsqrt`` is the IEEE ``1 / sqrt`` (the C++ kernel calls it too) while
    ``torch.sqrt`` is not correctly rounded (tests/test_gpu_defects.py checks both)."""
    v = var + eps
    return torch.sqrt(v).reciprocal() if v.is_cuda else torch.rsqrt(v)


def _normalize(z: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float):
    invstd_ = invstd(var, eps)
    xhat = (z.to(F32) - _bc(mean)) * _bc(invstd_)
    return xhat, xhat * _bc(weight.to(F32)) + _bc(bias.to(F32)), invstd_


def epilogue_fwd_torch(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits,
                       phi, psi):
    mean, var = stats_torch(z)
    out = fwd_given_torch(z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant,
                          a_bits, phi, psi)
    return out, mean, var


def stats_torch(z):
    """The batch statistics: mean and biased variance per channel, float32."""
    var, mean = torch.var_mean(z.to(F32), dim=(0, 2, 3), correction=0)
    return mean, var


def fwd_given_torch(z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant,
                    a_bits, phi, psi):
    """The forward from the statistics it is given (this rank's, or reduced across ranks)."""
    _, y, _ = _normalize(z, mean, var, weight, bias, eps)
    u = _phi(phi, y[:, :c_lp])
    if y.shape[1] == c_lp:
        out = _qa(a_quant, a_bits, u, step)
    else:
        fv = _phi(psi, y[:, c_lp:]) * f.to(F32)
        if scheme == 2:
            out = _combine(combine, _qa(a_quant, a_bits, u, step), fv)
        else:
            out = _qa(a_quant, a_bits, _combine(combine, u, fv), step)
    return out.to(z.dtype)


def epilogue_bwd_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine,
                       a_quant, a_bits, phi, psi):
    gy, xhat, invstd_, dstep = _dy_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps,
                                         scheme, combine, a_quant, a_bits, phi, psi)
    sum_g, sum_gx = _sums(gy, xhat)
    dz = _dz(gy, xhat, invstd_, weight, sum_g, sum_gx, z.numel() // z.shape[1])
    return dz.to(z.dtype), sum_gx.to(weight.dtype), sum_g.to(bias.dtype), dstep


def bwd_sums_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine,
                   a_quant, a_bits, phi, psi):
    """The backward's first half: this rank's sums of dy and dy * xhat (float64), LSQ's dstep."""
    gy, xhat, _, dstep = _dy_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme,
                                   combine, a_quant, a_bits, phi, psi)
    sum_g, sum_gx = _sums(gy, xhat)
    return sum_g.double(), sum_gx.double(), dstep


def bwd_given_torch(grad, z, weight, bias, f, step, mean, var, sum_g, sum_gx, count, c_lp, eps,
                    scheme, combine, a_quant, a_bits, phi, psi):
    """The backward's second half: dz from the sums (of every rank) over ``count`` values."""
    gy, xhat, invstd_, _ = _dy_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme,
                                     combine, a_quant, a_bits, phi, psi)
    return _dz(gy, xhat, invstd_, weight, sum_g.to(F32), sum_gx.to(F32), count).to(z.dtype)


def _sums(gy, xhat):
    return gy.sum(dim=(0, 2, 3)), (gy * xhat).sum(dim=(0, 2, 3))


def _dz(gy, xhat, invstd_, weight, sum_g, sum_gx, count):
    scale = weight.to(F32) * invstd_
    return _bc(scale) * (gy - _bc(sum_g / count) - xhat * _bc(sum_gx / count))


def _dy_torch(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant,
              a_bits, phi, psi):
    """The gradient reaching BatchNorm's output (dy), xhat, invstd and LSQ's dstep."""
    g = grad.to(F32)
    xhat, y, invstd = _normalize(z, mean, var, weight, bias, eps)
    y1 = y[:, :c_lp]
    u = _phi(phi, y1)
    fp = y.shape[1] > c_lp
    ff = f.to(F32)
    if not fp:
        gu, ds = _qa_backward(a_quant, a_bits, u, g, step)
    else:
        y2 = y[:, c_lp:]
        v = _phi(psi, y2)
        if scheme == 2:
            ga, gv = (g[:, :c_lp], g[:, c_lp:]) if combine == "concat" else (g, g if combine == "add" else -g)
            gu, ds = _qa_backward(a_quant, a_bits, u, ga, step)
        else:
            gs, ds = _qa_backward(a_quant, a_bits, _combine(combine, u, v * ff), g, step)
            gu, gv = (gs[:, :c_lp], gs[:, c_lp:]) if combine == "concat" else (gs, gs if combine == "add" else -gs)
        gv = gv * ff
        m2 = _phi_mask(psi, y2)
        gy2 = gv if m2 is None else torch.where(m2, gv, 0.0)
    m1 = _phi_mask(phi, y1)
    gy = gu if m1 is None else torch.where(m1, gu, 0.0)
    if fp:
        gy = torch.cat([gy, gy2], dim=1)
    dstep = ds if ds is not None else torch.zeros((), dtype=F32, device=z.device)
    return gy, xhat, invstd, dstep


# --------------------------------------------------------------------------- kernel choice

#: the epilogue's kernel entry points in expcuda.registry, and their reference (PyTorch) kernels
REFERENCE_KERNELS = {
    "block_epilogue_fwd": epilogue_fwd_torch,
    "block_epilogue_bwd": epilogue_bwd_torch,
    "block_epilogue_stats": stats_torch,
    "block_epilogue_fwd_given": fwd_given_torch,
    "block_epilogue_bwd_sums": bwd_sums_torch,
    "block_epilogue_bwd_given": bwd_given_torch,
}
for _op, _fn in REFERENCE_KERNELS.items():
    registry.declare(_op, (_fn.__doc__ or "the block epilogue").strip().splitlines()[0])
OPS = tuple(REFERENCE_KERNELS)

#: the epilogue tests' kernel names, and the backend each one is
KERNELS = {"torch": "reference", "cpp": "cpu", "triton": "triton", "cuda": "cuda"}


def use_kernel(name: str):
    """Force the epilogue's kernels (only theirs) to one backend inside the ``with`` block, by its
    kernel name (``torch``, ``cpp``, ``triton``, ``cuda``); the quantizers keep their choice."""
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {name!r}")
    return registry.use_backend(KERNELS[name], ops=OPS)


def kernel_unavailable(name: str) -> Optional[str]:
    """None when the epilogue kernel ``name`` can run here (float32, its own device), else why not."""
    backend = KERNELS[name]
    reason = registry.availability(backend)
    if reason is not None:
        return reason
    kernel = registry.kernel("block_epilogue_fwd", backend)
    if kernel is None:
        return f"the {backend} backend has no epilogue kernel"
    probe = torch.empty(0, device="cuda" if backend == "cuda" else "cpu")
    return kernel.refuses(probe)


def kernel_input(kernel, t: Tensor) -> Tensor:
    """t as ``kernel`` takes it: as it is, in its own layout, or NCHW-contiguous."""
    if kernel.layouts is None:
        return t
    fmt = layout(t)
    return t.contiguous(memory_format=fmt if fmt in kernel.layouts else torch.contiguous_format)


# --------------------------------------------------------------------------- the custom ops

def layout(z: Tensor) -> torch.memory_format:
    """The memory format the epilogue's outputs (and dz) share with z: channels_last or NCHW."""
    if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _block_epilogue_body(z: Tensor, weight: Tensor, bias: Tensor, f: Tensor, step: Optional[Tensor],
                   c_lp: int, eps: float, scheme: int, combine: str, a_quant: str, a_bits: int,
                   phi: str, psi: str) -> tuple[Tensor, Tensor, Tensor]:
    fmt = layout(z)
    kernel = registry.dispatch("block_epilogue_fwd", z)
    z = kernel_input(kernel, z)
    out, mean, var = kernel.fn(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits,
                         phi, psi)
    return out.contiguous(memory_format=fmt), mean, var


block_epilogue_op = define("expcuda::block_epilogue", _block_epilogue_body)


@block_epilogue_op.register_fake
def _(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    n, c, h, w = z.shape
    out = z.new_empty((n, out_channels(c, c_lp, combine), h, w)).contiguous(memory_format=layout(z))
    return out, z.new_empty((c,), dtype=F32), z.new_empty((c,), dtype=F32)


def _block_epilogue_backward_body(grad: Tensor, z: Tensor, weight: Tensor, bias: Tensor, f: Tensor,
                            step: Optional[Tensor], mean: Tensor, var: Tensor, c_lp: int, eps: float,
                            scheme: int, combine: str, a_quant: str, a_bits: int, phi: str,
                            psi: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = layout(z)
    kernel = registry.dispatch("block_epilogue_bwd", z)
    z = kernel_input(kernel, z)
    dz, dw, db, ds = kernel.fn(grad.contiguous(memory_format=layout(z)), z, weight, bias, f, step, mean, var,
                         c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi)
    return dz.contiguous(memory_format=fmt), dw, db, ds


block_epilogue_backward = define("expcuda::block_epilogue_backward", _block_epilogue_backward_body)


@block_epilogue_backward.register_fake
def _(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits, phi,
      psi):
    return (torch.empty_like(z, memory_format=layout(z)), torch.empty_like(weight),
            torch.empty_like(bias), z.new_empty((), dtype=F32))


def _setup(ctx, inputs, output):
    z, weight, bias, f, step, *rest = inputs
    _, mean, var = output
    ctx.save_for_backward(z, weight, bias, f, step, mean, var)
    ctx.rest = rest
    ctx.has_step = step is not None


def _backward(ctx, grad, _gmean, _gvar):
    z, weight, bias, f, step, mean, var = ctx.saved_tensors
    dz, dw, db, ds = call(ctx, block_epilogue_backward, grad, z, weight, bias, f, step if ctx.has_step else None,
                                             mean, var, *ctx.rest)
    dstep = ds.to(step.dtype).reshape(step.shape) if ctx.has_step else None
    return (dz, dw, db, None, dstep) + (None,) * len(ctx.rest)


autograd(block_epilogue_op, _backward, _setup)


def block_epilogue(*args):
    """The fused epilogue with autograd (see ``expcuda._custom`` for the eager path)."""
    return apply(block_epilogue_op, *args)
