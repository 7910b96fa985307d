"""Shared by the deploy tests: a small model trained on real Fashion-MNIST, and the collapsed
model's own activation codes and pre-BatchNorm values, layer by layer."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from expcuda import models
from expcuda.deploy import fold

WIDTH = 0.125  # small enough to train a few hundred steps inside a test
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
    model = models.svhn_net(WIDTH, in_channels=1, mode="lp", **dict(options))
    train, _ = fmnist()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: one thread is several times faster on a busy machine
    try:
        for _ in range(steps):
            idx = torch.randint(len(train), (32,), generator=gen)
            x, y = train.batch(idx)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(steps: int = 300, **options):
    """svhn_net(0.125) on 1-channel 40x40 inputs in LP mode (the collapsed form), trained ``steps``
    steps of batch 32 on real Fashion-MNIST, in eval mode (cached per setting)."""
    state = _trained_state(steps, tuple(sorted(options.items())))
    model = models.svhn_net(WIDTH, in_channels=1, mode="lp", **options)
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


@torch.no_grad()
def calibrated(width: float = 0.125, seed: int = 0, real: bool = False, granularity: str | None = None,
               **options):
    """An untrained svhn_net in LP mode whose BatchNorm statistics are the average over a few batches
    (random images, or real Fashion-MNIST ones with ``real``), in eval mode: every layer's codes vary.
    ``granularity`` swaps in SYQ weight quantizers of that granularity (not a ModelConfig option)."""
    from expcuda.nn.quantizers import WeightQuantizer

    torch.manual_seed(seed)
    model = models.svhn_net(width, in_channels=1, mode="lp", **options)
    if granularity is not None:
        for block in model.features:
            block.wq = WeightQuantizer("syq", options.get("w_bits", 2), block.lp_conv.kernel_size,
                                       granularity=granularity)
            block.wq.init_from(block.lp_conv.weight)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # the plain average of the batches' statistics
    model.train()
    for i in range(3):
        x = fmnist()[0].batch(torch.arange(64 * i, 64 * i + 64))[0] if real else torch.randn(32, 1, 40, 40)
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def near_step(block, z: torch.Tensor, in_max: float) -> torch.Tensor:
    """Where a block's float BatchNorm input ``z`` (NHWC, pooled conv output) lies so close to a step
    of its BatchNorm + quantizer that float32 rounding may put it on either side.

    The steps are ``z = mean + (level - beta) / k``, ``k = gamma / sqrt(var + eps)``, re-derived here
    from the BatchNorm. The distance allowed is the float32 error bound of the collapsed model's
    convolution, a sum of n = C*KH*KW products of inputs |a| <= in_max and weights |w| <= max|w|:
    |fl(sum) - sum| <= (n + 2) * 2**-24 * n * in_max * max|w| (the +2: a and w themselves rounded),
    plus a few float32 roundings of BatchNorm's own arithmetic (in z units).
    """
    aq = block.aq
    step = float(aq.step) if aq.kind == "lsq" else None
    levels = torch.tensor(fold.activation_levels(aq.kind, 1 if aq.kind == "sign" else aq.bits, step),
                          dtype=torch.float64)
    bn = block.lp_bn
    mean, var = bn.running_mean.double(), bn.running_var.double()
    k = bn.weight.double() / torch.sqrt(var + bn.eps)
    beta = bn.bias.double()
    w = block.wq(block.lp_conv.weight).detach().double()
    n = w[0].numel()
    u = 2.0**-24
    conv_err = (n + 2) * u * n * in_max * float(w.abs().max())
    safe_k = torch.where(k == 0, torch.ones_like(k), k)
    steps = mean[:, None] + (levels[None, :] - beta[:, None]) / safe_k[:, None]  # [O, levels]
    zd = z.double()[..., None]
    dist = (zd - steps).abs().amin(-1)
    bn_err = 8 * u * (zd.abs().squeeze(-1) + mean.abs() + (beta / safe_k).abs() + 1 / safe_k.abs())
    return (dist <= conv_err + bn_err) & (k != 0)
