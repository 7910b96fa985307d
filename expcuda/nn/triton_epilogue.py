"""The block epilogue in Triton: the elementwise work of forward and backward in one kernel each.

The per-channel statistics and sums are torch reductions (one native pass
each); the kernels do what the plain composition spreads over a dozen ops:
normalize, ``phi``/``Qa`` on LP channels, ``psi``/``f`` on FP channels and the
combine (forward), and the whole STE chain down to BatchNorm's input
gradient ``dy`` (backward).  Each program handles ``BLOCK`` elements of the
output; output element (n, co, k) reads its LP channel ``c1`` and FP channel
``c2`` of z (either may be absent).  z is NCHW-contiguous or channels_last
(the kernels index either; the outputs are laid out like z).  Float32 inside,
whatever the storage dtype.  On the CPU this runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    _REASON = None
except ImportError as exc:  # pragma: no cover - triton is a dependency of torch's CUDA builds
    _REASON = f"triton is not installed ({exc})"

from expcuda.nn import epilogue

BLOCK = 256


def unavailable() -> Optional[str]:
    if _REASON is not None:
        return _REASON
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA GPU is visible, and TRITON_INTERPRET=1 is not set"
    return None


if _REASON is None:
    from expcuda.quant import triton_kernels as tk
    from expcuda.quant.triton_kernels import _clamp, _rint  # the quantizers' rounding and clip

    @triton.jit
    def _div(a, b):
        """a / b rounded to nearest (Triton's ``/`` is approximate on GPU), b a scalar or like a."""
        return tl.div_rn(a, b + tl.zeros_like(a))

    @triton.jit
    def _phi(y, KIND: tl.constexpr):
        if KIND == 1:
            return tl.where(y > 0.0, y, tl.where(y != y, y, 0.0))
        elif KIND == 2:
            return _clamp(y, 0.0, 1.0)
        else:
            return y

    @triton.jit
    def _phi_keep(y, KIND: tl.constexpr):
        if KIND == 1:
            return y > 0.0
        elif KIND == 2:
            return (y >= 0.0) & (y <= 1.0)
        else:
            return (y == y) | (y != y)

    @triton.jit
    def _qa(u, levels, step, AQ: tl.constexpr, CLIP_ONLY: tl.constexpr):
        if AQ == 1:
            if CLIP_ONLY:
                return _clamp(u, 0.0, 1.0)
            else:
                return _div(_rint(_clamp(u, 0.0, 1.0) * levels), levels)
        elif AQ == 2:
            return (u > 0.0).to(tl.float32) - (u < 0.0).to(tl.float32)
        elif AQ == 3:
            return _rint(_clamp(_div(u, step), 0.0, levels)) * step
        else:
            return u

    @triton.jit
    def _qa_grad(u, g, levels, step, AQ: tl.constexpr):
        """(kept gradient, LSQ's step-gradient term)."""
        if AQ == 1:
            return tl.where((u >= 0.0) & (u <= 1.0), g, 0.0), g * 0.0
        elif AQ == 2:
            return tl.where(tl.abs(u) <= 1.0, g, 0.0), g * 0.0
        elif AQ == 3:
            v = _div(u, step)
            inside = (v >= 0.0) & (v <= levels)
            r = tl.where(inside, _rint(v) - v, tl.where(v < 0.0, 0.0, levels))
            return tl.where(inside, g, 0.0), g * r
        else:
            return g, g * 0.0

    @triton.jit
    def _locate(offs, hw, c_out, c_lp, c_tot, HAS_FP: tl.constexpr, CONCAT: tl.constexpr,
                CL: tl.constexpr):
        """(image, pixel, LP channel, FP channel) of output offsets in storage order."""
        if CL:  # channels_last: the channel varies fastest
            co = offs % c_out
            k = (offs // c_out) % hw
        else:
            k = offs % hw
            co = (offs // hw) % c_out
        n = offs // (hw * c_out)
        if HAS_FP:
            if CONCAT:
                c1 = tl.where(co < c_lp, co, -1)
                c2 = tl.where(co < c_lp, -1, co)
            else:
                c1 = co
                c2 = co + c_lp
        else:
            c1 = co
            c2 = co * 0 - 1
        return n, k, c1, c2

    @triton.jit
    def _at(n, k, ch, hw, c_tot, CL: tl.constexpr):
        """Storage offset of z[n, ch, k] (or of dy's) in NCHW or channels_last."""
        if CL:
            return (n * hw + k) * c_tot + ch
        else:
            return (n * c_tot + ch) * hw + k

    @triton.jit
    def _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, ch, hw, c_tot, mask, CL: tl.constexpr):
        m = mask & (ch >= 0)
        chs = tl.where(ch >= 0, ch, 0)
        z = tl.load(z_ptr + _at(n, k, chs, hw, c_tot, CL), mask=m, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + chs, mask=m, other=0.0)
        inv = tl.load(inv_ptr + chs, mask=m, other=0.0)
        w = tl.load(w_ptr + chs, mask=m, other=0.0)
        b = tl.load(b_ptr + chs, mask=m, other=0.0)
        return ((z - mu) * inv) * w + b, m

    @triton.jit
    def _fwd_kernel(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, out_ptr, f_ptr, s_ptr, levels, total, hw,
                    c_out, c_lp, c_tot, SCHEME: tl.constexpr, SUB: tl.constexpr,
                    CONCAT: tl.constexpr, HAS_FP: tl.constexpr, AQ: tl.constexpr,
                    CLIP_ONLY: tl.constexpr, PHI: tl.constexpr, PSI: tl.constexpr,
                    CL: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # z may pass 2**31
        f = tl.load(f_ptr)  # f and the step are read on the device: no host sync
        step = tl.load(s_ptr)
        mask = offs < total
        n, k, c1, c2 = _locate(offs, hw, c_out, c_lp, c_tot, HAS_FP, CONCAT, CL)
        y1, m1 = _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c1, hw, c_tot, mask, CL)
        u = _phi(y1, PHI)
        if HAS_FP:
            y2, m2 = _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c2, hw, c_tot, mask, CL)
            fv = _phi(y2, PSI) * f
            if CONCAT:
                if SCHEME == 2:
                    v = tl.where(m1, _qa(u, levels, step, AQ, CLIP_ONLY), fv)
                else:
                    v = _qa(tl.where(m1, u, fv), levels, step, AQ, CLIP_ONLY)
            else:
                if SCHEME == 2:
                    a = _qa(u, levels, step, AQ, CLIP_ONLY)
                    v = a - fv if SUB else a + fv
                else:
                    v = _qa(u - fv if SUB else u + fv, levels, step, AQ, CLIP_ONLY)
        else:
            v = _qa(u, levels, step, AQ, CLIP_ONLY)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(g_ptr, z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, dy_ptr, r_ptr, f_ptr, s_ptr, levels,
                    total, hw, c_out, c_lp, c_tot, SCHEME: tl.constexpr, SUB: tl.constexpr,
                    CONCAT: tl.constexpr, HAS_FP: tl.constexpr, AQ: tl.constexpr,
                    PHI: tl.constexpr, PSI: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # z may pass 2**31
        f = tl.load(f_ptr)  # f and the step are read on the device: no host sync
        step = tl.load(s_ptr)
        mask = offs < total
        n, k, c1, c2 = _locate(offs, hw, c_out, c_lp, c_tot, HAS_FP, CONCAT, CL)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y1, m1 = _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c1, hw, c_tot, mask, CL)
        u = _phi(y1, PHI)
        if HAS_FP:
            y2, m2 = _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c2, hw, c_tot, mask, CL)
            fv = _phi(y2, PSI) * f
            if SCHEME == 2:
                gu, rterm = _qa_grad(u, g, levels, step, AQ)
                gu = tl.where(m1, gu, 0.0)
                rterm = tl.where(m1, rterm, 0.0)
                gv = -g if SUB else g
            else:
                s = tl.where(m1, u, fv) if CONCAT else (u - fv if SUB else u + fv)
                gs, rterm = _qa_grad(s, g, levels, step, AQ)
                gu = gs
                gv = -gs if SUB else gs
            g2 = tl.where(_phi_keep(y2, PSI), gv * f, 0.0)
            c2s = tl.where(c2 >= 0, c2, 0)
            tl.store(dy_ptr + _at(n, k, c2s, hw, c_tot, CL), g2, mask=m2)
        else:
            gu, rterm = _qa_grad(u, g, levels, step, AQ)
        g1 = tl.where(_phi_keep(y1, PHI), gu, 0.0)
        c1s = tl.where(c1 >= 0, c1, 0)
        tl.store(dy_ptr + _at(n, k, c1s, hw, c_tot, CL), g1, mask=m1)
        tl.store(r_ptr + offs, rterm, mask=mask)


def _launch_args(z, weight, bias, mean, var, c_lp, eps, combine):
    c_tot = z.shape[1]
    has_fp = c_tot > c_lp
    c_out = epilogue.out_channels(c_tot, c_lp, combine) if has_fp else c_lp
    inv = torch.rsqrt(var + eps)
    return (c_tot, has_fp, c_out, inv, weight.to(torch.float32).contiguous(),
            bias.to(torch.float32).contiguous())


def _scalars(f, step, z):
    """f and the step (f again when there is none) as float32 one-element tensors on z's device,
    for the kernels to load: ``float(f)`` would wait for the GPU."""
    f = f.to(device=z.device, dtype=torch.float32).reshape(1)
    return f, (f if step is None else step.to(device=z.device, dtype=torch.float32).reshape(1))


def _levels(a_quant, a_bits):
    return float(2**a_bits - 1) if a_bits != 32 else 1.0


def forward(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    var, mean = torch.var_mean(z.to(torch.float32), dim=(0, 2, 3), correction=0)
    c_tot, has_fp, c_out, inv, w, b = _launch_args(z, weight, bias, mean, var, c_lp, eps, combine)
    n, _, h, wd = z.shape
    fmt = epilogue.layout(z)  # z is NCHW-contiguous or channels_last; out is laid out alike
    out = torch.empty((n, c_out, h, wd), dtype=z.dtype, device=z.device, memory_format=fmt)
    total = out.numel()
    f, s = _scalars(f, step, z)
    tk.launch(
        _fwd_kernel, (triton.cdiv(total, BLOCK),), z, mean, inv, w, b, out, f, s,
        _levels(a_quant, a_bits), total, h * wd, c_out, c_lp, c_tot, SCHEME=scheme, SUB=combine == "sub", CONCAT=combine == "concat", HAS_FP=has_fp,
        AQ=epilogue.A_QUANT_CODES[a_quant], CLIP_ONLY=a_bits == 32, PHI=epilogue.PHI_CODES[phi],
        PSI=epilogue.PHI_CODES[psi], CL=fmt == torch.channels_last, BLOCK=BLOCK)
    return out, mean, var


def backward(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
             phi, psi):
    c_tot, has_fp, c_out, inv, w, b = _launch_args(z, weight, bias, mean, var, c_lp, eps, combine)
    fmt = epilogue.layout(z)  # grad comes laid out like z (the op's body sees to it)
    dy = torch.empty(z.shape, dtype=torch.float32, device=z.device, memory_format=fmt)
    rterm = torch.empty(grad.shape, dtype=torch.float32, device=z.device)
    total = grad.numel()
    n, _, h, wd = z.shape
    fs, s = _scalars(f, step, z)
    levels = _levels(a_quant, a_bits)
    tk.launch(
        _bwd_kernel, (triton.cdiv(total, BLOCK),), grad, z, mean, inv, w, b, dy, rterm, fs, s,
        levels, total, h * wd, c_out, c_lp, c_tot,
        SCHEME=scheme, SUB=combine == "sub", CONCAT=combine == "concat", HAS_FP=has_fp,
        AQ=epilogue.A_QUANT_CODES[a_quant], PHI=epilogue.PHI_CODES[phi], PSI=epilogue.PHI_CODES[psi],
        CL=fmt == torch.channels_last, BLOCK=BLOCK)
    xhat = (z.to(torch.float32) - mean.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)
    count = z.numel() // c_tot
    sum_g = dy.sum(dim=(0, 2, 3))
    sum_gx = (dy * xhat).sum(dim=(0, 2, 3))
    scale = (w * inv).view(1, -1, 1, 1)
    dz = scale * (dy - (sum_g / count).view(1, -1, 1, 1) - xhat * (sum_gx / count).view(1, -1, 1, 1))
    if a_quant == "lsq":
        numel = (n * h * wd) * (c_out if (scheme == 1 and has_fp) else c_lp)
        ds = (rterm.to(torch.float64).sum() / math.sqrt(numel * levels)).to(torch.float32)
    else:
        ds = torch.zeros((), dtype=torch.float32, device=z.device)
    return dz.to(z.dtype), sum_gx.to(weight.dtype), sum_g.to(bias.dtype), ds
