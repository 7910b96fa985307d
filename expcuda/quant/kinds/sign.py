"""Sign activations (BNN / XNOR-Net) with the hardtanh straight-through backward."""

from __future__ import annotations

import torch
from torch import Tensor

from expcuda import _checks
from expcuda._custom import apply, autograd, define
from expcuda.quant import spec
from expcuda.quant.ops import (LIB, compiled_autograd, empty_dense_like, mask_like, masked_backward,
                                 masked_forward, masked_setup)
from expcuda.quant.reference import F32, pack_mask, sign

spec.kernels(sign_activation_fwd="sign activation: (x) -> (y, packed hardtanh STE mask)")


@spec.reference
def sign_activation_fwd(x: Tensor) -> tuple[Tensor, Tensor]:
    xf = x.to(F32)
    return sign(xf).to(x.dtype), pack_mask(xf.abs() <= 1)


def _sign_activation_op_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    return masked_forward("sign_activation_fwd", x)


sign_activation_op = define(f"{LIB}::sign_activation", _sign_activation_op_impl)


@sign_activation_op.register_fake
def _(x):
    return empty_dense_like(x), mask_like(x)


autograd(sign_activation_op, masked_backward, masked_setup)


@spec.public
def sign_activation(x: Tensor) -> Tensor:
    """``sign(x)`` with the STE ``dx = dy * [|x| <= 1]`` (BNN / XNOR-Net activations)."""
    _checks.float_tensor("x", x)
    if not torch.compiler.is_compiling():
        fast = compiled_autograd("sign_activation_fwd", "sign_activation_ste", x)
        if fast is not None:
            return fast(x)
    return apply(sign_activation_op, x)[0]


spec.selftest("sign_activation", [
    ("", sign_activation, lambda dt, dev: (spec.sample((2, 5, 3, 7), dt, dev),)),
    ("channels_last", sign_activation,
     lambda dt, dev: (spec.sample((2, 5, 3, 7), dt, dev, lo=-0.5, hi=1.5, channels_last=True),)),
])
