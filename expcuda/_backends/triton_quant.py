"""Triton kernels of every quantizer: the ``triton`` backend.

Each public function has the name and Python signature of its twin in
:mod:`expcuda.quant.reference` and reproduces it bit for bit (read that
module's docstring for the rules).  The same code runs on a CUDA GPU and, for
CPU tensors, under ``TRITON_INTERPRET=1``.  How the rules are kept here:

* every kernel loads its inputs as float32 and does float32 arithmetic;
  bfloat16 is loaded and stored through its bits (the interpreter's own
  bfloat16 conversion truncates), rounding to nearest even like torch;
* every launch goes through :func:`launch`, which passes ``enable_fp_fusion=False``: on GPU
  Triton would otherwise contract ``a * b + c`` into one FMA and skip a rounding the
  reference does (``tests/test_triton_ptx.py`` reads the sm_90 PTX for FMAs);
  divisions by a tensor use ``tl.div_rn`` (Triton's ``/`` is approximate on GPU);
* ``round`` is :func:`_rint`, an add-and-subtract of 2**23 (exact, half to
  even) that keeps the sign of a zero result as ``torch.round`` does;
* sums are float64 partial sums, one per program (or per group and chunk),
  added up by ``torch.sum`` in float64; the scalar arithmetic that follows a
  reduction is written with the very torch expressions the reference uses, on
  the tensors' device, so it rounds exactly as the reference does there;
* max|t| is reduced per program with NaN made explicit (``tl.max`` on GPU
  drops NaNs), then by ``torch.amax``, which propagates them;
* nothing reads a device value back to the host: data-dependent branches of
  the reference (``m == 0``) are taken inside the kernels.

Every division is IEEE-rounded (``tl.div_rn`` in the kernels, the reference's
``div`` for scalars after a reduction), as the reference defines it on every
device.
"""

from __future__ import annotations

import contextlib
import math

import numpy
import torch
import triton
import triton.language as tl

from expcuda.quant.reference import div

F32 = torch.float32
F64 = torch.float64

BLOCK = 1024          # elements per program; a multiple of 8 for the packed mask
RBLOCK = 1024         # elements per program of the reduction kernels
_LAUNCH = {"enable_fp_fusion": False}   # no FMA contraction (see the docstring)


def launch(kernel, grid, *args, **meta):
    """Every Triton launch of expcuda: ``kernel[grid](*args, **meta)`` without FMA contraction,
    on the GPU of its first tensor argument (Triton itself launches on the current device)."""
    if math.prod(grid) == 0:
        return  # an empty tensor: nothing to launch
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta, **_LAUNCH)


# --------------------------------------------------------------------------- device helpers

@triton.jit
def _load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """Load as float32; bfloat16 arrives as int16 bits and is widened exactly."""
    if IS_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_f32(ptr, offs, v, mask, IS_BF16: tl.constexpr):
    """Store float32 v in ptr's dtype, rounding to nearest even."""
    if IS_BF16:
        # the rounding c10::BFloat16 does: add 0x7FFF plus the kept lsb, drop 16 bits
        u = v.to(tl.uint32, bitcast=True)
        r = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
        r = tl.where(v != v, 0x7FC0, r)            # one quiet NaN, as torch writes it
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rint(v):
    """Round half to even, exactly as torch.round on float32 (NaN, Inf, -0 included)."""
    # Below 2**23 in magnitude, v +- 2**23 lands where the float32 spacing is 1,
    # so the add rounds v to an integer (ties to even) and the subtract is exact.
    # From 2**23 up every float32 is already an integer (and Inf/NaN pass through).
    magic = tl.where(v < 0.0, -8388608.0, 8388608.0)
    r = tl.where(tl.abs(v) < 8388608.0, (v + magic) - magic, v)
    # the add-subtract yields +0 for small negatives; torch.round(-0.3) is -0
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def _sign(v):
    """sign with sign(0) = sign(NaN) = 0, as the reference computes it."""
    return (v > 0.0).to(tl.float32) - (v < 0.0).to(tl.float32)


@triton.jit
def _clamp(v, lo, hi):
    """torch.clamp: NaN stays NaN, -0 stays -0 (both comparisons are false)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _pack_bits(keep, BLOCK: tl.constexpr):
    """BLOCK 0/1 flags -> BLOCK // 8 bytes, element 8i+j in bit j of byte i."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8))
    shifts = tl.arange(0, 8)
    return tl.sum(bits << shifts[None, :], axis=1).to(tl.uint8)


@triton.jit
def _block(numel, BLOCK: tl.constexpr):
    """This program's element offsets (int64: storage may pass 2**31) and their mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _store_mask(m_ptr, keep, numel, BLOCK: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(m_ptr + byte, _pack_bits(keep, BLOCK), mask=byte < (numel + 7) // 8)


# --------------------------------------------------------------------------- kernels: activations

@triton.jit
def _dorefa_act_fwd_kernel(x_ptr, y_ptr, m_ptr, numel, n,
                           X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    x = _load_f32(x_ptr, offs, inb, X_BF16)
    y = tl.div_rn(_rint(_clamp(x, 0.0, 1.0) * n), n)
    _store_f32(y_ptr, offs, y, inb, X_BF16)
    _store_mask(m_ptr, (x >= 0.0) & (x <= 1.0) & inb, numel, BLOCK)


@triton.jit
def _sign_act_fwd_kernel(x_ptr, y_ptr, m_ptr, numel, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    x = _load_f32(x_ptr, offs, inb, X_BF16)
    _store_f32(y_ptr, offs, _sign(x), inb, X_BF16)
    _store_mask(m_ptr, (tl.abs(x) <= 1.0) & inb, numel, BLOCK)


@triton.jit
def _mask_bwd_kernel(g_ptr, m_ptr, dx_ptr, numel, G_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    g = _load_f32(g_ptr, offs, inb, G_BF16)
    byte = tl.load(m_ptr + offs // 8, mask=inb, other=0).to(tl.int32)
    keep = ((byte >> (offs % 8).to(tl.int32)) & 1) != 0
    _store_f32(dx_ptr, offs, tl.where(keep, g, 0.0), inb, G_BF16)


# --------------------------------------------------------------------------- kernels: reductions

@triton.jit
def _absmax_partial_kernel(x_ptr, part_ptr, numel, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """part[pid] = max |x| over this program's block, NaN if the block holds one."""
    offs, inb = _block(numel, BLOCK)
    a = tl.abs(_load_f32(x_ptr, offs, inb, X_BF16))     # padding loads 0: harmless for a max
    nan = a != a
    biggest = tl.max(tl.where(nan, 0.0, a), axis=0)
    any_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    tl.store(part_ptr + tl.program_id(0), tl.where(any_nan, float("nan"), biggest))


# what _group_sum_kernel sums (per element, in float32, before widening to float64)
_SUM_ABS = 0          # |a|
_SUM_SIGN_B = 1       # sign(a) * b
_SUM_KEPT_SIGN_B = 2  # sign(a) * b where |a| > thr, else 0   (SYQ)


@triton.jit
def _group_sum_kernel(a_ptr, b_ptr, thr_ptr, part_ptr, G, B, AB, nchunks,
                      MODE: tl.constexpr, A_BF16: tl.constexpr, B_BF16: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Float64 partial sums per group, for a tensor seen as (A, G, B), group = middle index.

    Program g * nchunks + c sums the c-th chunk of BLOCK of group g's A*B elements into
    part[g, c].  One grid axis (axis 0 takes 2**31 - 1 programs; axes 1 and 2 stop at 65535,
    fewer than the rows of a large Linear weight).  Whole tensor: G = B = 1; XNOR filters:
    A = 1, G = out_channels; SYQ rows: (out*in, kh, kw); SYQ pixels: (out*in, kh*kw, 1).
    """
    pid = tl.program_id(0).to(tl.int64)
    g = pid // nchunks
    c = pid % nchunks
    k = c * BLOCK + tl.arange(0, BLOCK)
    inb = k < AB
    offs = ((k // B) * G + g) * B + k % B
    a = _load_f32(a_ptr, offs, inb, A_BF16)
    if MODE == 0:
        v = tl.abs(a)
    else:
        v = _sign(a) * _load_f32(b_ptr, offs, inb, B_BF16)
        if MODE == 2:
            v = tl.where(tl.abs(a) > tl.load(thr_ptr), v, 0.0)
    v = tl.where(inb, v, 0.0)
    tl.store(part_ptr + g * nchunks + c, tl.sum(v.to(tl.float64), axis=0))


# --------------------------------------------------------------------------- kernels: weights

@triton.jit
def _sign_scale_kernel(w_ptr, scale_ptr, thr_ptr, out_ptr, numel, G, B,
                       USE_THR: tl.constexpr, W_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out = sign(w) * scale[(i // B) % G]; with USE_THR, (sign(w) * (|w| > thr)) * scale."""
    offs, inb = _block(numel, BLOCK)
    w = _load_f32(w_ptr, offs, inb, W_BF16)
    s = _sign(w)
    if USE_THR:
        s = s * (tl.abs(w) > tl.load(thr_ptr)).to(tl.float32)
    scale = tl.load(scale_ptr + (offs // B) % G, mask=inb, other=0.0)
    _store_f32(out_ptr, offs, s * scale, inb, W_BF16)


@triton.jit
def _dorefa_w_fwd_kernel(t_ptr, m_ptr, out_ptr, numel, n,
                         OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    t = tl.load(t_ptr + offs, mask=inb, other=0.0)      # tanh(w) in float32, from ATen
    m = tl.load(m_ptr)
    d = 2.0 * m
    x = tl.div_rn(t, d + tl.zeros_like(t)) + 0.5
    r = _rint(x * n)
    wq = tl.div_rn(2.0 * r, n) - 1.0
    _store_f32(out_ptr, offs, tl.where(m == 0.0, 0.0, wq), inb, OUT_BF16)


@triton.jit
def _dorefa_w_bwd_stats_kernel(g_ptr, t_ptr, m_ptr, sum_ptr, ties_ptr, numel,
                               G_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Per program: the float64 sum of (2g) * (t / d) and how many |t| equal max|t|."""
    offs, inb = _block(numel, BLOCK)
    g = _load_f32(g_ptr, offs, inb, G_BF16)
    t = tl.load(t_ptr + offs, mask=inb, other=0.0)
    m = tl.load(m_ptr)
    d = 2.0 * m
    q = tl.div_rn(t, d + tl.zeros_like(t))
    prod = tl.where(inb, (2.0 * g) * q, 0.0)            # float32 product, then widened
    pid = tl.program_id(0)
    tl.store(sum_ptr + pid, tl.sum(prod.to(tl.float64), axis=0))
    tl.store(ties_ptr + pid, tl.sum(((tl.abs(t) == m) & inb).to(tl.int64), axis=0))


@triton.jit
def _dorefa_w_bwd_kernel(g_ptr, t_ptr, m_ptr, share_ptr, out_ptr, numel,
                         G_BF16: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    g = _load_f32(g_ptr, offs, inb, G_BF16)
    t = tl.load(t_ptr + offs, mask=inb, other=0.0)
    m = tl.load(m_ptr)
    d = 2.0 * m
    share = tl.load(share_ptr)
    g2 = 2.0 * g
    extra = tl.where(tl.abs(t) == m, _sign(t) * share, 0.0)
    dt = tl.div_rn(g2, d + tl.zeros_like(g2)) + extra
    dw = dt * (1.0 - t * t)
    _store_f32(out_ptr, offs, tl.where(m == 0.0, 0.0, dw), inb, OUT_BF16)


@triton.jit
def _xnor_bwd_kernel(g_ptr, w_ptr, alpha_ptr, t_ptr, out_ptr, numel, N,
                     G_BF16: tl.constexpr, W_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    g = _load_f32(g_ptr, offs, inb, G_BF16)
    w = _load_f32(w_ptr, offs, inb, W_BF16)
    o = offs // N                                        # output filter of each element
    alpha = tl.load(alpha_ptr + o, mask=inb, other=0.0)
    t = tl.load(t_ptr + o, mask=inb, other=0.0)
    direct = tl.where(tl.abs(w) <= 1.0, alpha * g, 0.0)
    _store_f32(out_ptr, offs, direct + _sign(w) * t, inb, W_BF16)


@triton.jit
def _syq_bwd_dw_kernel(g_ptr, scale_ptr, out_ptr, numel, G, B,
                       G_BF16: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    g = _load_f32(g_ptr, offs, inb, G_BF16)
    scale = tl.load(scale_ptr + (offs // B) % G, mask=inb, other=0.0)
    _store_f32(out_ptr, offs, scale * g, inb, OUT_BF16)


# --------------------------------------------------------------------------- kernels: LSQ

@triton.jit
def _lsq_fwd_kernel(x_ptr, s_ptr, y_ptr, numel, qn, qp, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs, inb = _block(numel, BLOCK)
    x = _load_f32(x_ptr, offs, inb, X_BF16)
    s = tl.load(s_ptr) + tl.zeros_like(x)
    v = tl.div_rn(x, s)
    _store_f32(y_ptr, offs, _rint(_clamp(v, qn, qp)) * s, inb, X_BF16)


@triton.jit
def _lsq_bwd_kernel(g_ptr, x_ptr, s_ptr, dx_ptr, part_ptr, numel, qn, qp,
                    G_BF16: tl.constexpr, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """dx, and per program the float64 sum of g * r for the step's gradient."""
    offs, inb = _block(numel, BLOCK)
    g = _load_f32(g_ptr, offs, inb, G_BF16)
    x = _load_f32(x_ptr, offs, inb, X_BF16)
    s = tl.load(s_ptr) + tl.zeros_like(x)
    v = tl.div_rn(x, s)
    inside = (v >= qn) & (v <= qp)
    _store_f32(dx_ptr, offs, tl.where(inside, g, 0.0), inb, X_BF16)
    # NaN is neither inside nor below, so it takes qp, as in the reference
    r = tl.where(inside, _rint(v) - v, tl.where(v < qn, qn, qp))
    prod = tl.where(inb, g * r, 0.0)
    tl.store(part_ptr + tl.program_id(0), tl.sum(prod.to(tl.float64), axis=0))


# --------------------------------------------------------------------------- host helpers

def _bits(t: torch.Tensor) -> torch.Tensor:
    """What a kernel gets for t: bfloat16 as its int16 bits (see _load_f32 / _store_f32)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _is_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16


def _grid(numel: int, block: int = BLOCK) -> tuple[int]:
    return (triton.cdiv(numel, block),)


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """max|t| over the whole tensor as a float32 0-dim tensor (NaN if any NaN)."""
    part = torch.empty(_grid(t.numel())[0], dtype=F32, device=t.device)
    launch(_absmax_partial_kernel, _grid(t.numel()), _bits(t), part, t.numel(),
           X_BF16=_is_bf16(t), BLOCK=BLOCK)
    return part.amax()


def _group_sums(mode: int, a: torch.Tensor, b=None, thr=None, G: int = 1, B: int = 1) -> torch.Tensor:
    """Float64 sums per group of a tensor seen as (A, G, B) (see _group_sum_kernel), shape (G,)."""
    ab = a.numel() // G
    nchunks = triton.cdiv(ab, RBLOCK)
    part = torch.empty((G, nchunks), dtype=F64, device=a.device)
    b = a if b is None else b
    thr = part if thr is None else thr               # unused unless MODE == 2
    launch(_group_sum_kernel, (G * nchunks,), _bits(a), _bits(b), thr, part, G, B, ab, nchunks,
           MODE=mode, A_BF16=_is_bf16(a), B_BF16=_is_bf16(b),
           BLOCK=RBLOCK)
    return part.sum(dim=1)


# --------------------------------------------------------------------------- DoReFa activations

def dorefa_activation_fwd(x, bits):
    if bits == 32:
        # no quantization: the input itself, and a mask with every element set
        nbytes = (x.numel() + 7) // 8
        mask = torch.full((nbytes,), 255, dtype=torch.uint8, device=x.device)
        if x.numel() % 8:
            mask[-1] = (1 << (x.numel() % 8)) - 1
        return x.clone(), mask
    n = float(2**bits - 1)
    y = torch.empty_like(x)
    mask = torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8, device=x.device)
    launch(_dorefa_act_fwd_kernel, _grid(x.numel()), _bits(x), _bits(y), mask, x.numel(), n,
           X_BF16=_is_bf16(x),
           BLOCK=BLOCK)
    return y, mask


def mask_bwd(grad, mask):
    dx = torch.empty_like(grad)
    launch(_mask_bwd_kernel, _grid(grad.numel()), _bits(grad), mask, _bits(dx), grad.numel(),
           G_BF16=_is_bf16(grad), BLOCK=BLOCK)
    return dx


# --------------------------------------------------------------------------- sign activations

def sign_activation_fwd(x):
    y = torch.empty_like(x)
    mask = torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8, device=x.device)
    launch(_sign_act_fwd_kernel, _grid(x.numel()), _bits(x), _bits(y), mask, x.numel(),
           X_BF16=_is_bf16(x), BLOCK=BLOCK)
    return y, mask


# --------------------------------------------------------------------------- DoReFa weights

def dorefa_weight_fwd(w, bits):
    out = torch.empty_like(w)
    if bits == 1:
        e = div(_group_sums(_SUM_ABS, w)[0], w.numel()).to(F32).reshape(1)
        launch(_sign_scale_kernel, _grid(w.numel()), _bits(w), e, e, _bits(out), w.numel(), 1, 1,
               USE_THR=False, W_BF16=_is_bf16(w),
               BLOCK=BLOCK)
        return out
    t = torch.tanh(w.to(F32))            # ATen's tanh, as every backend uses
    m = _absmax(t)
    n = float(2**bits - 1)
    launch(_dorefa_w_fwd_kernel, _grid(w.numel()), t, m, _bits(out), w.numel(), n,
           OUT_BF16=_is_bf16(w),
           BLOCK=BLOCK)
    return out


def dorefa_weight_bwd(grad, w, bits):
    if bits == 1:
        # the gradient passes unchanged (a copy: an op may not return its input)
        return grad.to(F32).to(w.dtype, copy=True)
    t = torch.tanh(w.to(F32))
    m = _absmax(t)
    nprog = _grid(w.numel())[0]
    sums = torch.empty(nprog, dtype=F64, device=w.device)
    ties = torch.empty(nprog, dtype=torch.int64, device=w.device)
    launch(_dorefa_w_bwd_stats_kernel, (nprog,), _bits(grad), t, m, sums, ties, w.numel(),
           G_BF16=_is_bf16(grad), BLOCK=BLOCK)
    # the reference's scalar arithmetic, verbatim: d(loss)/d(max|t|) shared by the ties
    d = 2 * m
    s = sums.sum()
    share = (-2.0 * s / d.to(F64) / ties.sum().to(F64)).to(F32)
    out = torch.empty_like(w)
    launch(_dorefa_w_bwd_kernel, (nprog,), _bits(grad), t, m, share, _bits(out), w.numel(),
           G_BF16=_is_bf16(grad), OUT_BF16=_is_bf16(w),
           BLOCK=BLOCK)
    return out


# --------------------------------------------------------------------------- XNOR weights

def _filters(w) -> tuple[int, int]:
    """(number of output filters, elements per filter) for a contiguous weight; (1, n) for an
    empty one, so that nothing divides by zero rows."""
    n = math.prod(w.shape[1:])
    return (w.shape[0] if w.dim() >= 2 and w.numel() else 1), n


def _xnor_alpha(w) -> torch.Tensor:
    rows, n = _filters(w)
    return div(_group_sums(_SUM_ABS, w, G=rows, B=w.numel() // rows), n).to(F32)


def xnor_weight_fwd(w):
    rows, _ = _filters(w)
    alpha = _xnor_alpha(w)
    out = torch.empty_like(w)
    launch(_sign_scale_kernel, _grid(w.numel()), _bits(w), alpha, alpha, _bits(out), w.numel(),
           rows, w.numel() // rows, USE_THR=False,
           W_BF16=_is_bf16(w), BLOCK=BLOCK)
    return out


def xnor_weight_bwd(grad, w):
    rows, n = _filters(w)
    alpha = _xnor_alpha(w)
    t = div(_group_sums(_SUM_SIGN_B, w, grad, G=rows, B=w.numel() // rows), n).to(F32)
    out = torch.empty_like(w)
    launch(_xnor_bwd_kernel, _grid(w.numel()), _bits(grad), _bits(w), alpha, t, _bits(out), w.numel(),
           w.numel() // rows, G_BF16=_is_bf16(grad),
           W_BF16=_is_bf16(w), BLOCK=BLOCK)
    return out


# --------------------------------------------------------------------------- SYQ weights

def _syq_groups(w, scales, granularity) -> tuple[int, int]:
    """(G, B): the weight seen as (A, G, B) with scale index = the middle one."""
    if granularity == "layer":
        g, b = 1, 1
    elif granularity == "row":            # scales (kh,) over a (out, in, kh, kw) weight
        g, b = (w.shape[-2], w.shape[-1]) if w.dim() == 4 else (-1, -1)
    elif granularity == "pixel":          # scales (kh, kw), shared by every (out, in)
        g, b = (math.prod(w.shape[2:]), 1) if w.dim() >= 3 else (-1, -1)
    else:
        raise ValueError(f"granularity must be layer, row or pixel; got {granularity!r}")
    if g != scales.numel():
        raise ValueError(f"SYQ {granularity} scales of shape {tuple(scales.shape)} do not fit "
                         f"a weight of shape {tuple(w.shape)}")
    return g, b


def _syq_threshold(w, eta) -> torch.Tensor:
    return (torch.tensor(eta, dtype=F32) * _absmax(w)).reshape(1)


def syq_weight_fwd(w, scales, eta, granularity):
    g, b = _syq_groups(w, scales, granularity)
    s = scales.to(F32).reshape(-1)
    thr = _syq_threshold(w, eta)
    out = torch.empty_like(w)
    launch(_sign_scale_kernel, _grid(w.numel()), _bits(w), s, thr, _bits(out), w.numel(), g, b,
           USE_THR=True, W_BF16=_is_bf16(w),
           BLOCK=BLOCK)
    return out


def syq_weight_bwd(grad, w, scales, eta, granularity):
    g, b = _syq_groups(w, scales, granularity)
    s = scales.to(F32).reshape(-1)
    thr = _syq_threshold(w, eta)
    dw = torch.empty_like(w)
    launch(_syq_bwd_dw_kernel, _grid(w.numel()), _bits(grad), s, _bits(dw), w.numel(), g, b,
           G_BF16=_is_bf16(grad), OUT_BF16=_is_bf16(w),
           BLOCK=BLOCK)
    ds = _group_sums(_SUM_KEPT_SIGN_B, w, grad, thr, G=g, B=b)
    return dw, ds.to(F32).to(scales.dtype).view_as(scales)


# --------------------------------------------------------------------------- LSQ

def _lsq_range(bits, signed) -> tuple[float, float]:
    if signed:
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qn, qp = 0, 2**bits - 1
    # torch.clamp compares with the bounds rounded to float32; so do the kernels
    return float(numpy.float32(qn)), float(numpy.float32(qp))


def lsq_fwd(x, step, bits, signed):
    qn, qp = _lsq_range(bits, signed)
    s = step.to(F32).reshape(1)
    y = torch.empty_like(x)
    launch(_lsq_fwd_kernel, _grid(x.numel()), _bits(x), s, _bits(y), x.numel(), qn, qp,
           X_BF16=_is_bf16(x), BLOCK=BLOCK)
    return y


def lsq_bwd(grad, x, step, bits, signed):
    qn, qp = _lsq_range(bits, signed)
    s = step.to(F32).reshape(1)
    dx = torch.empty_like(x)
    part = torch.empty(_grid(x.numel())[0], dtype=F64, device=x.device)
    launch(_lsq_bwd_kernel, _grid(x.numel()), _bits(grad), _bits(x), s, _bits(dx), part, x.numel(),
           qn, qp, G_BF16=_is_bf16(grad), X_BF16=_is_bf16(x),
           BLOCK=BLOCK)
    # the reference's scalar arithmetic, with its qp (not rounded to float32)
    qp_exact = float(2 ** (bits - 1) - 1) if signed else float(2**bits - 1)
    ds = div(part.sum(), math.sqrt(x.numel() * qp_exact)).to(F32)
    return dx, ds.to(step.dtype).view_as(step)


__all__ = [
    "dorefa_activation_fwd", "mask_bwd", "sign_activation_fwd",
    "dorefa_weight_fwd", "dorefa_weight_bwd", "xnor_weight_fwd", "xnor_weight_bwd",
    "syq_weight_fwd", "syq_weight_bwd", "lsq_fwd", "lsq_bwd",
]
