"""The expanded block as a plain composition of PyTorch ops: the definition of correct.

One op per step of the paper's Eq. 3 / Eq. 4: two convolutions, two
BatchNorms, ``phi``, ``Qa``, ``psi``, the factor ``f`` and the combine; every
other implementation is tested against these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expcuda.nn.quantizers import apply_phi


def combine(kind: str, a: Tensor, b: Tensor) -> Tensor:
    if kind == "concat":
        return torch.cat([a, b], dim=1)
    return a + b if kind == "add" else a - b


def lp_only(block, x: Tensor, extra: bool) -> Tensor:
    """The block at f == 0: the FP branch is not computed; concat pads its channels with zeros.

    Without the scheme-1 concat, this is exactly the plain block's forward (fused or not).
    """
    if block.combine != "concat":
        return block.lp_forward(x, extra)
    if block.scheme == 2:
        a = block.lp_forward(x, extra)
        return torch.cat([a, a.new_zeros((a.shape[0], block.fp_channels, *a.shape[2:]))], dim=1)
    y1 = block.lp_pre(x, extra)
    zeros = y1.new_zeros((y1.shape[0], block.fp_channels, *y1.shape[2:]))
    return block.aq.quantize(torch.cat([apply_phi(block.aq.phi, y1), zeros], dim=1))


def expanded(block, x: Tensor, extra: bool) -> Tensor:
    """Eq. 3 (scheme 1) or Eq. 4 (scheme 2); the folded variant in its two-convolution form."""
    f = block.f.to(x.dtype)
    if block.fold:
        z1 = block.conv(x, block.lp_weight(extra), pool=False)
        z2 = block.conv(x, block.fp_weight(extra), pool=False)
        z = z1 + f * z2 if block.combine == "add" else z1 - f * z2
        if block.pool is not None:
            z = block.pool(z)
        return block.aq(block.lp_bn(z))
    y1 = block.lp_pre(x, extra)
    y2 = block.fp_bn(block.conv(x, block.fp_weight(extra)))
    fv = apply_phi(block.fp_activation, y2) * f
    if block.scheme == 2:
        return combine(block.combine, block.aq(y1), fv)
    return block.aq.quantize(combine(block.combine, apply_phi(block.aq.phi, y1), fv))
