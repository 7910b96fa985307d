"""BatchNorm with batch statistics over every DDP rank, on any device and process group.

PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only.  Without it, a DDP run on CPUs
(gloo) normalises each rank's share of the batch with that share's statistics,
so it trains a different function than one process on the whole batch.
:class:`SyncBatchNorm2d` all-reduces per-channel sums instead (the backward
all-reduces the gradients of the sums), which makes the statistics those of the
global batch: each rank's float32 mean and biased variance over its n values,
as float64 ``n * mean`` and ``n * (var + mean^2)`` (:func:`reduce_moments`; the
decomposition is exact, so only the local float32 moments round).
Blocks whose BatchNorm is synced run the fused epilogue with the same reduction
(``synced_epilogue``); this module serves the reference composition and every
other BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from expcuda.nn.fused import update_running_stats


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, t: Tensor, group=None) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        ctx.group = group
        return t

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_moments(mean: Tensor, var: Tensor, n: int, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch's per-channel mean and biased variance (float64) and its number of
    values per channel, from this rank's ``mean`` and ``var`` over ``n`` values per channel."""
    c = mean.numel()
    if n:
        m, v = mean.to(torch.float64), var.to(torch.float64)
        local = torch.cat([m * n, (v + m * m) * n, m.new_full((1,), float(n))])
    else:  # an empty share of the batch adds nothing
        local = mean.new_zeros((2 * c + 1,), dtype=torch.float64)
    sums = _SumOverRanks.apply(local, group)
    count = sums[-1]
    gmean = sums[:c] / count
    return gmean, (sums[c:2 * c] / count - gmean * gmean).clamp_min(0), count


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics cover the batch of every rank."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        local_var, local_mean = torch.var_mean(x.to(torch.float32), dim=(0, 2, 3), correction=0)
        mean, var, n = reduce_moments(local_mean, local_var, x.numel() // c)
        if self.track_running_stats:
            update_running_stats(self, mean.detach(), var.detach(), int(n))
        shape = (1, c, 1, 1)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def is_synced(bn: nn.Module) -> bool:
    """Whether ``bn`` takes its statistics across ranks (ours or PyTorch's GPU version)."""
    return isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm))


def convert(module: nn.Module) -> nn.Module:
    """Every ``nn.BatchNorm2d`` in ``module`` replaced by :class:`SyncBatchNorm2d`.

    The new layers hold the same parameter and buffer tensors, so an optimizer built
    on the old ones keeps working and the state_dict keys do not change.
    """
    out = module
    if type(module) is nn.BatchNorm2d:
        out = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device="meta")
        for name, p in module.named_parameters(recurse=False):
            setattr(out, name, p)
        for name, b in module.named_buffers(recurse=False):
            setattr(out, name, b)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert(child))
    return out
