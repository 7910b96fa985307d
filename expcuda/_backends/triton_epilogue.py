"""The block epilogue in Triton: statistics, forward and backward as fused kernels.

Forward: per-channel partial sums of ``z - shift`` and its square in float64 (one program per
channel and chunk, no float32 copy of z), finished on the device; then one elementwise kernel
normalizes, applies ``phi``/``Qa`` on LP channels, ``psi``/``f`` on FP channels and combines.
Backward, as the C++ and CUDA kernels do it: one pass recomputes the STE chain down to
BatchNorm's output gradient ``dy`` and reduces, per output channel and chunk, the sums of
``dy`` and ``dy * xhat`` of its LP and FP channel (and LSQ's step-gradient terms); a second
pass recomputes ``dy`` and writes ``dz``.  Per element, only z, the gradient and the results
touch memory.  Output element (n, co, k) reads its LP channel ``c1`` and FP channel ``c2`` of
z (either may be absent).  z is NCHW-contiguous or channels_last (the kernels index either;
the outputs are laid out like z).  Float32 inside, float64 sums, whatever the storage dtype.
On the CPU this runs only under ``TRITON_INTERPRET=1``.
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
from expcuda.quant.reference import div

BLOCK = 256


def unavailable() -> Optional[str]:
    if _REASON is not None:
        return _REASON
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA GPU is visible, and TRITON_INTERPRET=1 is not set"
    return None


if _REASON is None:
    from expcuda._backends import triton_quant as tk
    from expcuda._backends.triton_quant import _clamp, _rint  # the quantizers' rounding and clip

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
    def _sources(co, c_lp, HAS_FP: tl.constexpr, CONCAT: tl.constexpr):
        """(LP channel, FP channel) of z behind output channels co; -1 where absent."""
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
        return c1, c2

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
        c1, c2 = _sources(co, c_lp, HAS_FP, CONCAT)
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
        xhat = (z - mu) * inv
        return xhat, xhat * w + b, m

    @triton.jit
    def _branches(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c1, c2, hw, c_tot, mask, f,
                  HAS_FP: tl.constexpr, PHI: tl.constexpr, PSI: tl.constexpr, CL: tl.constexpr):
        """Both branches of an output element: the LP channel's xhat, y, mask and u = phi(y), the
        FP channel's xhat, y, mask and fv = psi(y) * f (zeros and an empty mask without one)."""
        x1, y1, m1 = _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c1, hw, c_tot, mask, CL)
        u = _phi(y1, PHI)
        if HAS_FP:
            x2, y2, m2 = _load_y(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c2, hw, c_tot, mask,
                                 CL)
            fv = _phi(y2, PSI) * f
        else:
            x2 = x1 * 0.0
            y2 = x2
            m2 = mask & (c2 >= 0)  # c2 is -1: no FP channel
            fv = x2
        return x1, y1, m1, u, x2, y2, m2, fv

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
        _, _, m1, u, _, _, _, fv = _branches(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c1, c2, hw,
                                             c_tot, mask, f, HAS_FP, PHI, PSI, CL)
        if HAS_FP:
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
    def _dy(g, n, k, c1, c2, mask, z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, f, step, levels, hw,
            c_tot, SCHEME: tl.constexpr, SUB: tl.constexpr, CONCAT: tl.constexpr,
            HAS_FP: tl.constexpr, AQ: tl.constexpr, PHI: tl.constexpr, PSI: tl.constexpr,
            CL: tl.constexpr):
        """The STE chain from the output gradient g down to BatchNorm's output: (dy and xhat of
        the LP channel, its mask, the same of the FP channel, LSQ's step-gradient term)."""
        x1, y1, m1, u, x2, y2, m2, fv = _branches(z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, n, k, c1, c2,
                                                  hw, c_tot, mask, f, HAS_FP, PHI, PSI, CL)
        if HAS_FP:
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
            g2 = tl.where(_phi_keep(y2, PSI) & m2, gv * f, 0.0)
        else:
            gu, rterm = _qa_grad(u, g, levels, step, AQ)
            g2 = x2  # zeros: no FP channel
        g1 = tl.where(_phi_keep(y1, PHI) & m1, gu, 0.0)
        return g1, x1, m1, g2, x2, m2, tl.where(mask, rterm, 0.0)

    @triton.jit
    def _stats_kernel(z_ptr, shift_ptr, part_ptr, count, hw, c_tot, nchunks, CL: tl.constexpr,
                      BLOCK: tl.constexpr):
        """part[ch, chunk] = float64 sums of d and d * d, d = z - shift[ch], over the chunk's
        BLOCK elements of channel ch (shift: the channel's first element, against cancellation)."""
        pid = tl.program_id(0).to(tl.int64)
        ch = pid // nchunks
        j = (pid % nchunks) * BLOCK + tl.arange(0, BLOCK)
        mask = j < count
        z = tl.load(z_ptr + _at(j // hw, j % hw, ch, hw, c_tot, CL), mask=mask, other=0.0)
        d = tl.where(mask, z.to(tl.float32).to(tl.float64) - tl.load(shift_ptr + ch), 0.0)
        tl.store(part_ptr + pid * 2, tl.sum(d, axis=0))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(d * d, axis=0))

    @triton.jit
    def _bwd_sums_kernel(g_ptr, z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, f_ptr, s_ptr, part_ptr,
                         levels, count, hw, c_out, c_lp, c_tot, nchunks, SCHEME: tl.constexpr,
                         SUB: tl.constexpr, CONCAT: tl.constexpr, HAS_FP: tl.constexpr,
                         AQ: tl.constexpr, PHI: tl.constexpr, PSI: tl.constexpr,
                         CL: tl.constexpr, BLOCK: tl.constexpr):
        """part[co, chunk, :] = float64 sums over the chunk's BLOCK elements of output channel co:
        dy1, dy1 * xhat1 (its LP channel), dy2, dy2 * xhat2 (its FP channel), LSQ's terms."""
        pid = tl.program_id(0).to(tl.int64)
        co = pid // nchunks + tl.zeros((BLOCK,), dtype=tl.int64)
        j = (pid % nchunks) * BLOCK + tl.arange(0, BLOCK)
        mask = j < count
        n, k = j // hw, j % hw
        c1, c2 = _sources(co, c_lp, HAS_FP, CONCAT)
        g = tl.load(g_ptr + _at(n, k, co, hw, c_out, CL), mask=mask, other=0.0).to(tl.float32)
        g1, x1, m1, g2, x2, m2, rterm = _dy(
            g, n, k, c1, c2, mask, z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, tl.load(f_ptr),
            tl.load(s_ptr), levels, hw, c_tot, SCHEME, SUB, CONCAT, HAS_FP, AQ, PHI, PSI, CL)
        out = part_ptr + pid * 5
        tl.store(out, tl.sum(g1.to(tl.float64), axis=0))
        tl.store(out + 1, tl.sum(tl.where(m1, g1 * x1, 0.0).to(tl.float64), axis=0))
        tl.store(out + 2, tl.sum(g2.to(tl.float64), axis=0))
        tl.store(out + 3, tl.sum(tl.where(m2, g2 * x2, 0.0).to(tl.float64), axis=0))
        if AQ == 3:
            tl.store(out + 4, tl.sum(rterm.to(tl.float64), axis=0))
        else:
            tl.store(out + 4, 0.0)

    @triton.jit
    def _dz_kernel(g_ptr, z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, f_ptr, s_ptr, scale_ptr, a_ptr,
                   bc_ptr, dz_ptr, levels, total, hw, c_out, c_lp, c_tot, SCHEME: tl.constexpr,
                   SUB: tl.constexpr, CONCAT: tl.constexpr, HAS_FP: tl.constexpr,
                   AQ: tl.constexpr, PHI: tl.constexpr, PSI: tl.constexpr, CL: tl.constexpr,
                   BLOCK: tl.constexpr):
        """dz = scale * ((dy - a) - xhat * b) of both channels behind each output element."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        n, k, c1, c2 = _locate(offs, hw, c_out, c_lp, c_tot, HAS_FP, CONCAT, CL)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g1, x1, m1, g2, x2, m2, _ = _dy(
            g, n, k, c1, c2, mask, z_ptr, mean_ptr, inv_ptr, w_ptr, b_ptr, tl.load(f_ptr),
            tl.load(s_ptr), levels, hw, c_tot, SCHEME, SUB, CONCAT, HAS_FP, AQ, PHI, PSI, CL)
        _store_dz(dz_ptr, scale_ptr, a_ptr, bc_ptr, n, k, c1, g1, x1, m1, hw, c_tot, CL)
        if HAS_FP:
            _store_dz(dz_ptr, scale_ptr, a_ptr, bc_ptr, n, k, c2, g2, x2, m2, hw, c_tot, CL)

    @triton.jit
    def _store_dz(dz_ptr, scale_ptr, a_ptr, bc_ptr, n, k, ch, dy, xhat, m, hw, c_tot,
                  CL: tl.constexpr):
        chs = tl.where(ch >= 0, ch, 0)
        scale = tl.load(scale_ptr + chs, mask=m, other=0.0)
        a = tl.load(a_ptr + chs, mask=m, other=0.0)
        b = tl.load(bc_ptr + chs, mask=m, other=0.0)
        dz = scale * ((dy - a) - xhat * b)
        tl.store(dz_ptr + _at(n, k, chs, hw, c_tot, CL), dz.to(dz_ptr.dtype.element_ty), mask=m)


RBLOCK = 1024  # elements of one channel per program of the reduction kernels


def _launch_args(z, weight, bias, mean, var, c_lp, eps, combine):
    c_tot = z.shape[1]
    has_fp = c_tot > c_lp
    c_out = epilogue.out_channels(c_tot, c_lp, combine) if has_fp else c_lp
    inv = epilogue.invstd(var, eps)
    return (c_tot, has_fp, c_out, inv, weight.to(torch.float32).contiguous(),
            bias.to(torch.float32).contiguous())


def _scalars(f, step, z):
    """f and the step (f again when there is none) as float32 one-element tensors on z's device,
    for the kernels to load: ``float(f)`` would wait for the GPU."""
    f = f.to(device=z.device, dtype=torch.float32).reshape(1)
    return f, (f if step is None else step.to(device=z.device, dtype=torch.float32).reshape(1))


def _levels(a_quant, a_bits):
    return float(2**a_bits - 1) if a_bits != 32 else 1.0


def _consts(scheme, combine, has_fp, a_quant, phi, psi, fmt):
    """The constexprs every epilogue kernel takes."""
    return dict(SCHEME=scheme, SUB=combine == "sub", CONCAT=combine == "concat", HAS_FP=has_fp,
                AQ=epilogue.A_QUANT_CODES[a_quant], PHI=epilogue.PHI_CODES[phi],
                PSI=epilogue.PHI_CODES[psi], CL=fmt == torch.channels_last)


def _statistics(z, fmt):
    """Per-channel (var, mean) of z over (N, H, W), biased, as float32: float64 sums of z minus
    the channel's first element, by chunks of RBLOCK, finished on the device."""
    n, c_tot, h, wd = z.shape
    count = n * h * wd
    if count == 0:  # NaN statistics, as torch gives them
        return torch.var_mean(z.to(torch.float32), dim=(0, 2, 3), correction=0)
    nchunks = triton.cdiv(count, RBLOCK)
    shift = z[0, :, 0, 0].to(torch.float64).contiguous()
    part = torch.empty((c_tot, nchunks, 2), dtype=torch.float64, device=z.device)
    tk.launch(_stats_kernel, (c_tot * nchunks,), z, shift, part, count, h * wd, c_tot, nchunks,
              CL=fmt == torch.channels_last, BLOCK=RBLOCK)
    s, ss = part.sum(dim=1).unbind(1)
    dmean = s / count
    var = (ss / count - dmean * dmean).clamp_min(0.0)
    return var.to(torch.float32), (shift + dmean).to(torch.float32)


def forward(z, weight, bias, f, step, c_lp, eps, scheme, combine, a_quant, a_bits, phi, psi):
    fmt = epilogue.layout(z)  # z is NCHW-contiguous or channels_last; out is laid out alike
    var, mean = _statistics(z, fmt)
    c_tot, has_fp, c_out, inv, w, b = _launch_args(z, weight, bias, mean, var, c_lp, eps, combine)
    n, _, h, wd = z.shape
    out = torch.empty((n, c_out, h, wd), dtype=z.dtype, device=z.device, memory_format=fmt)
    total = out.numel()
    f, s = _scalars(f, step, z)
    tk.launch(_fwd_kernel, (triton.cdiv(total, BLOCK),), z, mean, inv, w, b, out, f, s,
              _levels(a_quant, a_bits), total, h * wd, c_out, c_lp, c_tot,
              CLIP_ONLY=a_bits == 32, BLOCK=BLOCK,
              **_consts(scheme, combine, has_fp, a_quant, phi, psi, fmt))
    return out, mean, var


def _per_channel(sums, c_lp, has_fp, combine, q):
    """Output channels' sums q (LP) and q + 2 (FP) laid out per channel of z."""
    if not has_fp:
        return sums[:, q]
    if combine == "concat":
        return torch.cat([sums[:c_lp, q], sums[c_lp:, q + 2]])
    return torch.cat([sums[:, q], sums[:, q + 2]])


def backward(grad, z, weight, bias, f, step, mean, var, c_lp, eps, scheme, combine, a_quant, a_bits,
             phi, psi):
    c_tot, has_fp, c_out, inv, w, b = _launch_args(z, weight, bias, mean, var, c_lp, eps, combine)
    fmt = epilogue.layout(z)  # grad comes laid out like z (the op's body sees to it)
    n, _, h, wd = z.shape
    count = n * h * wd
    fs, s = _scalars(f, step, z)
    levels = _levels(a_quant, a_bits)
    consts = _consts(scheme, combine, has_fp, a_quant, phi, psi, fmt)
    nchunks = triton.cdiv(count, RBLOCK)
    part = torch.zeros((c_out, nchunks, 5), dtype=torch.float64, device=z.device)
    tk.launch(_bwd_sums_kernel, (c_out * nchunks,), grad, z, mean, inv, w, b, fs, s, part, levels,
              count, h * wd, c_out, c_lp, c_tot, nchunks, BLOCK=RBLOCK, **consts)
    sums = part.sum(dim=1)
    sum_g = _per_channel(sums, c_lp, has_fp, combine, 0).to(torch.float32)
    sum_gx = _per_channel(sums, c_lp, has_fp, combine, 1).to(torch.float32)
    # BatchNorm's backward coefficients, rounded as the C++ and CUDA kernels round them
    a, bc = div(sum_g, float(count)), div(sum_gx, float(count))
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)
    tk.launch(_dz_kernel, (triton.cdiv(grad.numel(), BLOCK),), grad, z, mean, inv, w, b, fs, s,
              w * inv, a, bc, dz, levels, grad.numel(), h * wd, c_out, c_lp, c_tot, BLOCK=BLOCK,
              **consts)
    if a_quant == "lsq":
        numel = count * (c_out if (scheme == 1 and has_fp) else c_lp)
        ds = div(sums[:, 4].sum(), math.sqrt(numel * levels)).to(torch.float32)
    else:
        ds = torch.zeros((), dtype=torch.float32, device=z.device)
    return dz, sum_gx.to(weight.dtype), sum_g.to(bias.dtype), ds
