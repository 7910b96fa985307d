"""The fused epilogue with BatchNorm statistics over every DDP rank.

The local op (``expcuda::block_epilogue``) computes its statistics and its
backward sums in one call.  Here the same kernels run in their passes with an
all-reduce in between: this rank's per-channel mean and variance, summed over
the ranks (:func:`reduce_moments`);
the normalise / quantize / combine pass from those statistics;
in the backward, this rank's sums of dy and dy * xhat, summed over the ranks,
then dz from them.  BatchNorm's weight and bias gradients stay this rank's
sums: DDP averages them as it does every gradient.

Kernels: the registry's ``block_epilogue_stats`` / ``_fwd_given`` / ``_bwd_sums`` /
``_bwd_given``: the C++ CPU kernel, and the PyTorch kernels of ``epilogue.py`` for
everything else (CUDA tensors included: the CUDA and Triton kernels have no split form).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from expcuda import registry
from expcuda.nn import epilogue


def is_synced(bn) -> bool:
    """Whether ``bn`` takes its statistics across ranks (``sync_bn.SyncBatchNorm2d`` or
    PyTorch's GPU ``nn.SyncBatchNorm``)."""
    return getattr(bn, "reduces_across_ranks", False) or isinstance(bn, torch.nn.SyncBatchNorm)


def reduce_group(bn) -> Optional[object]:
    """The process group ``bn``'s statistics are reduced over, or None when they are this
    rank's own: ``bn`` is not synced, no process group is initialised, or it has one rank."""
    if not bn.training or not is_synced(bn) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(bn, "process_group", None)  # nn.SyncBatchNorm's
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def reduce_moments(mean: Tensor, var: Tensor, n: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch's per-channel mean and biased variance (float64) and its number of
    values per channel, from this rank's float32 ``mean`` and ``var`` over ``n`` values per
    channel: summed over the ranks as float64 ``n * mean`` and ``n * (var + mean^2)`` (the
    decomposition is exact, so only the local float32 moments round)."""
    c = mean.numel()
    if n:
        m, v = mean.to(torch.float64), var.to(torch.float64)
        sums = torch.cat([m * n, (v + m * m) * n, m.new_full((1,), float(n))])
    else:  # an empty share of the batch adds nothing
        sums = mean.new_zeros((2 * c + 1,), dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    count = sums[-1]
    gmean = sums[:c] / count
    return gmean, (sums[c:2 * c] / count - gmean * gmean).clamp_min(0), count


class Passes:
    """The four passes of one backend: ``stats``, ``fwd_given``, ``bwd_sums``, ``bwd_given``."""

    def __init__(self, backend: str):
        self.backend = backend
        for name in ("stats", "fwd_given", "bwd_sums", "bwd_given"):
            kernel = registry.kernel(f"block_epilogue_{name}", backend)
            setattr(self, name, kernel.fn)


def kernels(z: Tensor) -> Passes:
    """The passes of the backend the dispatcher picks for this z (honouring a forced one; the
    PyTorch kernels for an empty batch, which the compiled passes do not take)."""
    backend = "reference" if z.numel() == 0 else registry.dispatch("block_epilogue_stats", z).backend
    passes = _PASSES.get(backend)
    if passes is None:
        passes = _PASSES[backend] = Passes(backend)
    return passes


_PASSES: dict = {}


def _kernel_input(t: Tensor) -> Tensor:
    """z (or its gradient) as every kernel takes it: NCHW-contiguous or channels_last."""
    return t.contiguous(memory_format=epilogue.layout(t))


class _SyncedEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, f, step, group, *args):
        z = _kernel_input(z)
        k = kernels(z)
        c, n = z.shape[1], z.numel() // z.shape[1]
        local = k.stats(z) if n else (z.new_zeros((c,), dtype=torch.float32),) * 2
        mean, var, count = reduce_moments(*local, n, group)
        mean, var, count = mean.float(), var.float(), float(count)
        out = k.fwd_given(z, weight, bias, f, step, mean, var, *args)
        ctx.save_for_backward(z, weight, bias, f, step, mean, var)
        ctx.args, ctx.group, ctx.count, ctx.kernels = args, group, count, k
        ctx.has_step = step is not None
        ctx.mark_non_differentiable(mean, var)
        return out.contiguous(memory_format=epilogue.layout(z)), mean, var, count

    @staticmethod
    def backward(ctx, grad, _gmean, _gvar, _gcount):
        z, weight, bias, f, step, mean, var = ctx.saved_tensors
        step = step if ctx.has_step else None
        k, args = ctx.kernels, ctx.args
        grad = grad.contiguous(memory_format=epilogue.layout(z))
        sum_g, sum_gx, dstep = k.bwd_sums(grad, z, weight, bias, f, step, mean, var, *args)
        c = z.shape[1]
        total = torch.cat([sum_g, sum_gx])
        dist.all_reduce(total, group=ctx.group)
        dz = k.bwd_given(grad, z, weight, bias, f, step, mean, var, total[:c], total[c:], ctx.count,
                         *args)
        # BatchNorm's weight and bias gradients: this rank's sums, rounded as the local op does
        dw = sum_gx.float().to(weight.dtype)
        db = sum_g.float().to(bias.dtype)
        dstep = dstep.to(step.dtype).reshape(step.shape) if step is not None else None
        return (dz, dw, db, None, dstep, None) + (None,) * len(args)


def block_epilogue(group, z: Tensor, weight: Tensor, bias: Tensor, f: Tensor, step: Optional[Tensor],
                   *args) -> tuple[Tensor, Tensor, Tensor, int]:
    """``epilogue.block_epilogue`` with statistics over ``group``'s ranks: (out, mean, var, count),
    count the number of values per channel over every rank (for the running variance)."""
    out, mean, var, count = _SyncedEpilogue.apply(z, weight, bias, f, step, group, *args)
    return out, mean, var, int(count)
