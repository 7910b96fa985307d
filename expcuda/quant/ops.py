"""What the quantizers' custom ops share: dense layouts, the packed STE mask and its backward.

Each quantizer's own ops are in its module in ``expcuda/quant/kinds``; each calls its kernel
entry points through :func:`kernel`, the one dispatcher's pick for the inputs.  Activation
quantizers (DoReFa, sign) save their straight-through mask packed 8 elements per byte:
forward writes it beside the output, and backward (:data:`ste_mask_backward`) reads 1/32 of
a float32 tensor instead of the whole saved input (see the README for the measurement).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from expcuda import _ext, registry
from expcuda._custom import call, define
from expcuda.quant import reference, spec

LIB = "expcuda"


def kernel(op: str, t: Tensor):
    """The kernel function the dispatcher picks for entry point ``op`` on tensors like ``t``."""
    return registry.dispatch(op, t).fn


def compiled_autograd(entry: str, composite: str, x: Tensor):
    """The C++ autograd op ``<composite>`` (forward + STE backward in one node, in
    csrc/cpu/ste_autograd.cpp) when the dispatcher's kernel for ``entry`` on ``x`` is the compiled
    one as registered (not forced elsewhere, nor replaced), else None.  It runs the same kernels
    without the Python autograd.Function around them: the eager fast path.  For a plain Tensor it
    is ``expcuda._C.<composite>`` (a pybind11 function: ~2 us less per call than torch.ops); a
    Tensor subclass gets ``torch.ops.expcuda_C.<composite>``, which honours __torch_function__."""
    fn = registry.dispatch(entry, x).fn
    fast = _FAST.get((entry, fn))
    if fast is None:
        compiled = getattr(torch.ops.expcuda_C, entry, None) if _ext.REASON is None else None
        if fn is compiled and _ext.has_kernel(composite, "CompositeImplicitAutograd"):  # fn is never None
            fast = (getattr(_ext._C, composite), getattr(torch.ops.expcuda_C, composite))
        else:
            fast = (None, None)
        _FAST[(entry, fn)] = fast
    return fast[0] if type(x) is Tensor else fast[1]


_FAST: dict = {}  # (entry, the dispatched kernel function) -> (pybind function, torch.ops op)


def dense(x: Tensor) -> Tensor:
    """x itself if its storage is a dense block (any layout), else a contiguous copy."""
    if x.is_contiguous() or is_non_overlapping_and_dense(x):  # the first test is the cheap one
        return x
    return x.contiguous()


def empty_dense_like(x: Tensor, dtype=None) -> Tensor:
    if is_non_overlapping_and_dense(x):
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


def empty_weight_like(w: Tensor) -> Tensor:
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def masked_forward(entry: str, x: Tensor, *args) -> tuple[Tensor, Tensor]:
    """The body of an activation op returning (y, packed STE mask): x made dense, an empty x
    answered here (the kernels take non-empty tensors), else ``entry``'s kernel."""
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), mask_like(x)
    return kernel(entry, x)(x, *args)


def weight_forward(entry: str, w: Tensor, *args) -> Tensor:
    """The body of a weight quantizer's forward op: w contiguous, empty answered here."""
    w = w.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return kernel(entry, w)(w, *args)


def weight_backward(entry: str, grad: Tensor, w: Tensor, *args) -> Tensor:
    """The body of a weight quantizer's backward op returning dw alone."""
    grad, w = grad.contiguous(), w.contiguous()
    if w.numel() == 0:
        return torch.empty_like(w)
    return kernel(entry, w)(grad, w, *args)


def mask_like(x: Tensor) -> Tensor:
    return torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8, device=x.device)


def as_layout(grad: Tensor, like_stride) -> Tensor:
    """grad with the strides of the forward output, so kernels can walk storage in step."""
    if grad.stride() == tuple(like_stride):
        return grad
    out = torch.empty_strided(grad.shape, like_stride, dtype=grad.dtype, device=grad.device)
    return out.copy_(grad)


# --------------------------------------------------------------------------- packed-mask STE backward

spec.kernels(mask_bwd="STE backward from a packed mask: (grad, mask) -> dx")
spec.reference(reference.mask_bwd)


def _ste_mask_backward_impl(grad: Tensor, mask: Tensor) -> Tensor:
    if grad.numel() == 0:
        return torch.empty_like(grad)
    return kernel("mask_bwd", grad)(grad, mask)


ste_mask_backward = define(f"{LIB}::ste_mask_backward", _ste_mask_backward_impl)


@ste_mask_backward.register_fake
def _(grad, mask):
    return torch.empty_like(grad)


def masked_setup(ctx, inputs, output):
    """The autograd setup of an activation op that returns (y, packed mask)."""
    y, mask = output
    ctx.save_for_backward(mask)
    ctx.out_stride = y.stride()
    ctx.n_inputs = len(inputs)


def masked_backward(ctx, grad_y, grad_mask):
    (mask,) = ctx.saved_tensors
    grad_x = call(ctx, ste_mask_backward, as_layout(grad_y, ctx.out_stride), mask)
    return (grad_x,) + (None,) * (ctx.n_inputs - 1)
