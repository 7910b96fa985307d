"""Run by tests/test_train_ddp.py under torchrun: gradients of two gloo ranks against one process.

Every rank takes its half of one global batch of random images (random, so no
tied values put ReLU or max-pool decisions on a rounding edge), runs forward and
backward through DistributedDataParallel, once with the BatchNorms synced
(``expcuda.nn.sync_bn``) and once per rank; rank 0 then computes the whole batch
in one process and writes, for each variant, the relative difference of the
logits and the largest difference of a parameter's gradient (relative to the
norm of all gradients) to the JSON file named by argv[1], with the number of fused
epilogue calls that took their statistics across the ranks (``synced_epilogue``).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from expcuda import models
from expcuda.nn import sync_bn, synced_epilogue


def build(mode: str):
    torch.manual_seed(0)
    model = models.svhn_net(0.125, num_classes=10, in_channels=1, mode=mode).train()
    for m in model.modules():
        if hasattr(m, "set_f"):
            m.set_f(0.5)
    return model


def grads(model, x, y):
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    inner = getattr(model, "module", model)  # DDP names its parameters module.*
    return logits.detach(), {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


_synced_calls = 0
_synced_epilogue = synced_epilogue.block_epilogue


def _counting(*args):
    global _synced_calls
    _synced_calls += 1
    return _synced_epilogue(*args)


synced_epilogue.block_epilogue = _counting  # fused.py calls it through the module


def bare_batchnorm(rank: int, world: int) -> dict:
    """A SyncBatchNorm2d without affine parameters or running statistics, on its own: its output
    and input gradient on each rank's half against nn.BatchNorm2d on the whole batch (rank 0)."""
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(8, 3, 5, 5, generator=g), torch.randn(8, 3, 5, 5, generator=g)
    bn = sync_bn.SyncBatchNorm2d(3, affine=False, track_running_stats=False).train()
    mine = x[rank::world].clone().requires_grad_(True)
    out = bn(mine)
    out.backward(dy[rank::world])
    outs, grads_ = [torch.empty_like(out) for _ in range(world)], [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(outs, out.detach())
    dist.all_gather(grads_, mine.grad)
    if rank != 0:
        return {}
    whole = x.clone().requires_grad_(True)
    want = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False).train()(whole)
    want.backward(dy)
    got_out = torch.stack(outs, 1).reshape(x.shape)
    got_grad = torch.stack(grads_, 1).reshape(x.shape)
    return {"bare-bn": {"out": rel(got_out, want.detach()), "grad": rel(got_grad, whole.grad)}}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 40, 40, generator=g), torch.randint(0, 10, (16,), generator=g)
    report = {}
    for mode in ("fp", "exp"):
        for synced in (True, False):
            model = build(mode)
            model = sync_bn.convert(model) if synced else model
            global _synced_calls
            _synced_calls = 0
            logits, got = grads(DistributedDataParallel(model), x[rank::world], y[rank::world])
            fused_synced = _synced_calls
            parts = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(parts, logits)
            if rank == 0:
                want_logits, want = grads(build(mode), x, y)
                full = torch.stack(parts, 1).reshape(-1, logits.shape[1])  # rank r held rows r::world
                # each gradient's error against the whole gradient's norm: some (an FP BN's bias
                # feeding straight into the next BN) are zero up to rounding, so their own
                # relative error is noise
                scale = torch.cat([v.flatten() for v in want.values()]).norm()
                report[f"{mode}-{'synced' if synced else 'per-rank'}"] = {
                    "logits": rel(full, want_logits), "fused_synced": fused_synced,
                    "grads": max(((got[n] - want[n]).norm() / scale).item() for n in want)}
    report.update(bare_batchnorm(rank, world))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(report, fh)
    dist.barrier()  # rank 0's single-process pass must end before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
