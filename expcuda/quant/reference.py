"""Pure-PyTorch quantizer kernels: the definition of correct.

The helpers every quantizer's reference kernels share (each quantizer's own
kernels are in its module in ``expcuda/quant/kinds``, and reachable here by name).
Every other backend (C++ CPU, CUDA, Triton) must reproduce the reference kernels
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


# --------------------------------------------------------------------------- the packed-mask STE backward

def mask_bwd(grad: Tensor, mask: Tensor) -> Tensor:
    """dx = grad where the packed STE mask is set, else 0 (grad has x's layout)."""
    keep = unpack_mask(mask, grad)
    return torch.where(keep, grad.to(F32), torch.zeros((), dtype=F32)).to(grad.dtype)


def __getattr__(name: str):
    """A quantizer's reference kernel (they live in its module in ``expcuda/quant/kinds``)."""
    from expcuda.quant import spec
    import expcuda.quant  # noqa: F401  (imports every quantizer module)
    try:
        return spec.REFERENCE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
