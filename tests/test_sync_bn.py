"""expcuda.nn.sync_bn without a process group: the conversion, and plain BatchNorm's behaviour."""

from __future__ import annotations

import torch
from torch import nn

from expcuda import models
from expcuda.nn import ExpandedConv2d, sync_bn


def test_convert_shares_parameters_and_keeps_keys():
    torch.manual_seed(0)
    model = models.svhn_net(0.125, num_classes=10, in_channels=1, mode="exp")
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    converted = sync_bn.convert(model)
    assert list(converted.state_dict()) == keys
    assert all(p is params[n] for n, p in converted.named_parameters())  # an optimizer stays valid
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is sync_bn.SyncBatchNorm2d for m in bns)


def test_without_process_group_it_is_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    synced = sync_bn.convert(nn.Sequential(bn))
    x = torch.randn(4, 5, 3, 3)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()  # F.batch_norm updates these
    want = nn.functional.batch_norm(x, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    assert torch.equal(synced(x), want)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 1


def test_synced_block_runs_fused_and_without_ranks_is_the_local_op():
    """Synced blocks run the fused epilogue; without a process group its statistics are the
    batch's own, so the block computes exactly what the unsynced block does."""
    from tests.test_block_support import step

    torch.manual_seed(0)
    block = ExpandedConv2d(4, 6, 3, padding=1).train()
    block.set_f(0.5)
    x = torch.randn(3, 4, 6, 6)
    want = step(block, x)
    synced = sync_bn.convert(block)
    assert sync_bn.is_synced(synced.lp_bn) and synced.use_fused()
    got = step(synced, x)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want if want[k] is not None)


def test_cli_flag_turns_sync_off():
    from expcuda.train.args import config_from_args, parser

    assert config_from_args(parser().parse_args(["--preset", "fmnist"])).sync_bn is True
    cfg = config_from_args(parser().parse_args(["--preset", "fmnist", "--no-sync-bn"]))
    assert cfg.sync_bn is False and "sync_bn" in cfg.identity()  # resuming must keep the choice
