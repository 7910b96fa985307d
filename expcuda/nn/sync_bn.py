"""BatchNorm with batch statistics over every DDP rank, on any device and process group.

PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only.  Without it, a DDP run on CPUs
(gloo) normalises each rank's share of the batch with that share's statistics,
so it trains a different function than one process on the whole batch.
:class:`SyncBatchNorm2d` runs the fused epilogue with its statistics summed over the
ranks (``synced_epilogue``: one all-reduce in the forward, one in the backward), as
the blocks whose BatchNorm is synced do: BatchNorm alone is the epilogue with no
activation and no quantizer (``fused.batchnorm_epilogue``).
"""

from __future__ import annotations

from torch import Tensor, nn

from expcuda.nn import fused
from expcuda.nn.synced_epilogue import is_synced, reduce_group  # noqa: F401  (is_synced: this module's API)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics cover the batch of every rank."""

    reduces_across_ranks = True  # what synced_epilogue.is_synced looks for

    def forward(self, x: Tensor) -> Tensor:
        if reduce_group(self) is None:  # eval, no process group, or one rank: plain BatchNorm
            return super().forward(x)
        self._check_input_dim(x)
        return fused.batchnorm_epilogue(self, x)


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
