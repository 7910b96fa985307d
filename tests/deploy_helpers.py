"""Shared by the deploy tests: a small model trained on real Fashion-MNIST, and the collapsed
model's own activation codes and pre-BatchNorm values, layer by layer."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from expcuda import models
from expcuda.deploy import fold

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))
                                  and not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte")),
                                  reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@functools.lru_cache(maxsize=1)
def fmnist(limit_train: int = 6000, limit_test: int = 512):
    """(train, test) TensorData of Fashion-MNIST fitted to svhn_net's 40x40 input."""
    from expcuda.data import registry
    bundle = registry.load("fmnist", size=40, channels=1, limit_train=limit_train, limit_test=limit_test)
    return bundle.train, bundle.test


def test_images(n: int = 256):
    _, test = fmnist()
    x, y = test.batch(torch.arange(min(n, len(test))))
    return x, y


@functools.lru_cache(maxsize=None)
def _trained_state(steps: int, options: tuple):
    torch.manual_seed(0)
    model = models.svhn_net(0.25, in_channels=1, mode="lp", **dict(options))
    train, _ = fmnist()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train), (64,), generator=gen)
        x, y = train.batch(idx)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(steps: int = 200, **options):
    """svhn_net(0.25) on 1-channel 40x40 inputs in LP mode (the collapsed form), trained ``steps``
    steps of batch 64 on real Fashion-MNIST, in eval mode (cached per setting)."""
    state = _trained_state(steps, tuple(sorted(options.items())))
    model = models.svhn_net(0.25, in_channels=1, mode="lp", **options)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def collapsed_trace(model, x):
    """The collapsed model's activation codes (uint8 NHWC, stem then every LP block) and each LP
    block's BatchNorm input (its pooled conv output, NHWC float32)."""
    codes, pre = [], []
    hooks = []

    def keep_codes(aq):
        def hook(_mod, _inp, out):
            step = float(aq.step) if aq.kind == "lsq" else None
            bits = 1 if aq.kind == "sign" else aq.bits
            codes.append(fold.codes_from_values(aq.kind, bits, out, step).permute(0, 2, 3, 1).contiguous())
        return hook

    hooks.append(model.stem[-1].register_forward_hook(keep_codes(model.stem[-1])))
    for block in model.features:
        hooks.append(block.aq.register_forward_hook(keep_codes(block.aq)))
        hooks.append(block.lp_bn.register_forward_hook(
            lambda _m, inp, _o: pre.append(inp[0].permute(0, 2, 3, 1).contiguous())))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return codes, pre, logits
