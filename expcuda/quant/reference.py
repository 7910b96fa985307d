"""Pure-PyTorch quantizer kernels: the definition of correct.

Every other backend (C++ CPU, CUDA, Triton) must reproduce these functions
bit for bit, so the order of every floating-point operation below is part of
the contract and is repeated in ``csrc/common/quant_math.h`` and in the Triton
kernels.  The rules all backends follow:

* arithmetic in float32, whatever the input dtype; results are cast back to
  the input's dtype with round-to-nearest-even;
* ``round`` is round-half-to-even (``torch.round``);
* ``sign(v) = (v > 0) - (v < 0)``, so ``sign(0) = sign(NaN) = 0``;
* reductions that are sums (means, scale gradients) accumulate in float64 and
  are rounded to float32 once at the end; max-reductions are exact;
* ``tanh`` is taken from ATen on the tensor's device in every backend (no two
  libm's agree on it to the last bit);
* elementwise kernels see the tensor's storage as a flat array (inputs are
  dense: contiguous, channels_last or any other dense layout); the STE mask of
  the activation quantizers is packed 8 elements per byte, bit ``j`` of byte
  ``i`` standing for storage element ``8*i + j``.

NaN and Inf: NaN inputs give NaN outputs where the formula produces them and
a zero STE gradient (every range test with NaN is false); for weight
quantizers with a tensor-wide scale a NaN anywhere makes the scale NaN.  +-Inf
is clipped like any large value by the clipping quantizers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F32 = torch.float32
F64 = torch.float64


# --------------------------------------------------------------------------- helpers

def levels(bits: int) -> float:
    return float(2**bits - 1)


def div(a: Tensor, b: float) -> Tensor:
    """a / b, IEEE-rounded on every device.

    ATen on CUDA computes ``tensor / python_number`` as a multiplication by the
    rounded reciprocal; dividing by a tensor on a's own device is a true
    division everywhere, as the C++, CUDA and Triton kernels do.  ``torch.full`` writes b on the
    device with a fill kernel: no blocking host-to-device copy (``torch.tensor(b, device=...)``).
    """
    return a / torch.full((), b, dtype=a.dtype, device=a.device)


def sign(v: Tensor) -> Tensor:
    """sign with sign(0) = sign(NaN) = 0, as float32."""
    return (v > 0).to(F32) - (v < 0).to(F32)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor (storage order) into uint8, 8 elements a byte, little-endian bits."""
    flat = _flat(mask).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, like: Tensor) -> Tensor:
    """The bool mask, shaped and strided like ``like``, from its packed bytes."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.view(-1, 1) >> shifts) & 1).view(-1)[: like.numel()].bool()
    return _from_flat(bits, like)


def _flat(t: Tensor) -> Tensor:
    """The tensor's storage, in storage order, as a 1-D view (t must be dense)."""
    if t.is_contiguous():
        return t.reshape(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).reshape(-1)


def _from_flat(flat: Tensor, like: Tensor) -> Tensor:
    out = torch.empty_like(like, dtype=flat.dtype)
    _flat(out).copy_(flat)
    return out


def _sum64(v: Tensor, dims=None) -> Tensor:
    v = v.to(F64)
    return v.sum() if dims is None else v.sum(dim=dims)


def _filter_dims(w: Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


# --------------------------------------------------------------------------- DoReFa activations

def dorefa_activation_fwd(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    xf = x.to(F32)
    if bits == 32:
        return x.clone(), pack_mask(torch.ones_like(x, dtype=torch.bool))
    n = levels(bits)
    y = div(torch.round(torch.clamp(xf, 0.0, 1.0) * n), n)
    return y.to(x.dtype), pack_mask((xf >= 0) & (xf <= 1))


def mask_bwd(grad: Tensor, mask: Tensor) -> Tensor:
    """dx = grad where the packed STE mask is set, else 0 (grad has x's layout)."""
    keep = unpack_mask(mask, grad)
    return torch.where(keep, grad.to(F32), torch.zeros((), dtype=F32)).to(grad.dtype)


# --------------------------------------------------------------------------- sign activations

def sign_activation_fwd(x: Tensor) -> tuple[Tensor, Tensor]:
    xf = x.to(F32)
    return sign(xf).to(x.dtype), pack_mask(xf.abs() <= 1)


# --------------------------------------------------------------------------- DoReFa weights

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


# --------------------------------------------------------------------------- XNOR weights

def _xnor_alpha(wf: Tensor) -> Tensor:
    dims = _filter_dims(wf)
    n = math.prod(wf.shape[1:])
    return div(_sum64(wf.abs(), dims), n).to(F32).view(-1, *([1] * len(dims)))


def xnor_weight_fwd(w: Tensor) -> Tensor:
    wf = w.to(F32)
    return (sign(wf) * _xnor_alpha(wf)).to(w.dtype)


def xnor_weight_bwd(grad: Tensor, w: Tensor) -> Tensor:
    wf, g = w.to(F32), grad.to(F32)
    dims = _filter_dims(wf)
    n = math.prod(wf.shape[1:])
    s = sign(wf)
    alpha = _xnor_alpha(wf)
    t = div(_sum64(s * g, dims), n).to(F32).view_as(alpha)
    direct = torch.where(wf.abs() <= 1, alpha * g, torch.zeros((), dtype=F32))
    return (direct + s * t).to(w.dtype)


# --------------------------------------------------------------------------- SYQ weights

def _syq_view(scales: Tensor, granularity: str) -> Tensor:
    """scales broadcast against a (out, in, kh, kw) weight (or any weight for 'layer')."""
    s = scales.to(F32)
    if granularity == "row":
        return s.view(-1, 1)
    return s


def syq_weight_fwd(w: Tensor, scales: Tensor, eta: float, granularity: str) -> Tensor:
    wf = w.to(F32)
    thr = torch.tensor(eta, dtype=F32) * wf.abs().amax()
    keep = (wf.abs() > thr).to(F32)
    return ((sign(wf) * keep) * _syq_view(scales, granularity)).to(w.dtype)


def syq_weight_bwd(grad: Tensor, w: Tensor, scales: Tensor, eta: float,
                   granularity: str) -> tuple[Tensor, Tensor]:
    wf, g = w.to(F32), grad.to(F32)
    thr = torch.tensor(eta, dtype=F32) * wf.abs().amax()
    keep = wf.abs() > thr
    dw = (_syq_view(scales, granularity) * g).to(w.dtype)
    contrib = torch.where(keep, sign(wf) * g, torch.zeros((), dtype=F32))
    if granularity == "layer":
        ds = _sum64(contrib)
    elif granularity == "row":
        ds = _sum64(contrib, (0, 1, 3))
    else:
        ds = _sum64(contrib, (0, 1))
    return dw, ds.to(F32).to(scales.dtype).view_as(scales)


# --------------------------------------------------------------------------- LSQ

def lsq_range(bits: int, signed: bool) -> tuple[float, float]:
    if signed:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def lsq_fwd(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    qn, qp = lsq_range(bits, signed)
    s = step.to(F32).reshape(())
    v = x.to(F32) / s
    return (torch.round(torch.clamp(v, qn, qp)) * s).to(x.dtype)


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
