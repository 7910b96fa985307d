"""The fused path of the expanded block: one convolution, one epilogue.

The LP and FP weights are stacked along the output channels, so the input is
read by a single convolution (forward and both backward convolutions), and
``expcuda::block_epilogue`` does BN, ``phi``, ``Qa``, ``psi``, ``f`` and the
combine.  The folded variant convolves once with ``Qw(W1) +- f*W2``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from expcuda.nn import epilogue, synced_epilogue


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What F.batch_norm does to the running statistics in training mode (unbiased variance)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)


def _epilogue(bn: nn.Module, z: Tensor, *args) -> tuple[Tensor, Tensor, Tensor, int]:
    """The epilogue op: (out, mean, var, values per channel), the statistics over every DDP rank
    when ``bn`` is synced across more than one, else this batch's own."""
    group = synced_epilogue.reduce_group(bn)
    if group is not None:
        return synced_epilogue.block_epilogue(group, z, *args)
    out, mean, var = epilogue.block_epilogue(z, *args)
    return out, mean, var, z.numel() // z.shape[1]


def batchnorm_epilogue(bn: nn.BatchNorm2d, z: Tensor, f: Optional[Tensor] = None, step: Optional[Tensor] = None,
                       a_quant: str = "none", a_bits: int = 32, phi: str = "identity") -> Tensor:
    """BN with this batch's statistics (every rank's when ``bn`` is synced), then ``phi`` and Qa,
    as one epilogue op over z's channels; the running statistics updated as F.batch_norm does.
    With the defaults it is BatchNorm alone (``sync_bn.SyncBatchNorm2d`` runs it)."""
    weight, bias = bn.weight, bn.bias
    if weight is None:  # affine=False: the epilogue's scale 1 and shift 0
        weight = z.new_ones((z.shape[1],), dtype=torch.float32)
        bias = z.new_zeros((z.shape[1],), dtype=torch.float32)
    out, mean, var, count = _epilogue(
        bn, z, weight, bias, f if f is not None else z.new_zeros((), dtype=torch.float32), step,
        z.shape[1], float(bn.eps), 2, "add", a_quant, a_bits, phi, "identity")
    update_running_stats(bn, mean, var, count)
    return out


def lp_epilogue(block, z: Tensor) -> Tensor:
    """BN (batch statistics), phi and Qa of the LP branch alone: the plain block, the folded block."""
    bn = block.lp_bn
    if not block.training or not bn.track_running_stats:
        return block.aq(bn(z))
    a_quant, a_bits, phi = block.aq.epilogue_args()
    step = block.aq.step if a_quant == "lsq" else None
    return batchnorm_epilogue(bn, z, getattr(block, "f", None), step, a_quant, a_bits, phi)


def forward(block, x: Tensor, extra: bool) -> Tensor:
    wq = block.lp_weight(extra)
    w2 = block.fp_weight(extra).to(wq.dtype)
    if block.fold:
        f = block.f.to(wq.dtype)
        return lp_epilogue(block, block.conv(x, wq + f * w2 if block.combine == "add" else wq - f * w2))
    if block.lp_conv.groups == 1:
        z = block.conv(x, torch.cat([wq, w2], dim=0))
    else:  # stacking would mix the groups: two convolutions, one epilogue
        z = torch.cat([block.conv(x, wq), block.conv(x, w2)], dim=1)
    lp_bn, fp_bn = block.lp_bn, block.fp_bn
    if block.training or not lp_bn.track_running_stats:
        weight = torch.cat([lp_bn.weight, fp_bn.weight])
        bias = torch.cat([lp_bn.bias, fp_bn.bias])
        a_quant, a_bits, phi = block.aq.epilogue_args()
        step = block.aq.step if a_quant == "lsq" else None
        out, mean, var, count = _epilogue(
            lp_bn, z, weight, bias, block.f, step, block.out_channels, float(lp_bn.eps), block.scheme,
            block.combine, a_quant, a_bits, phi, block.fp_activation)
        if block.training:
            c = block.out_channels
            update_running_stats(lp_bn, mean[:c], var[:c], count)
            update_running_stats(fp_bn, mean[c:], var[c:], count)
        return out
    raise RuntimeError("the fused epilogue serves batch statistics only; eval uses the reference")
