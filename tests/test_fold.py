"""The folded variant: one convolution on Qw(W1) +- f*W2, equal to its two-convolution form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d
from tests.test_block import inputs, permuted_reference
from tests.test_block_support import assert_close_to, step


def make(**kw):
    torch.manual_seed(0)
    opts = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, scheme=1, fold=True)
    opts.update(kw)
    block = ExpandedConv2d(**opts)
    block.set_f(0.6)
    return block


@pytest.mark.parametrize("opts", [
    dict(), dict(combine="sub"), dict(w_quant="xnor", a_quant="sign"),
    dict(w_quant="syq", a_quant="lsq"), dict(w_quant="lsq", a_quant="none", stride=2),
    dict(groups=2, pool=nn.MaxPool2d(2)), dict(padding=0, dilation=2),
])
@pytest.mark.parametrize("training", [True, False])
def test_fold_matches_two_convolutions(opts, training):
    block = make(**opts).train(training)
    x = inputs()
    two_conv = step(block, x, mode="reference")
    noise = permuted_reference(block, x)
    noise.update({k: v for k, v in two_conv.items() if "running" in k})
    one_conv = step(block, x)
    assert block.fp_bn is None  # one BN, after the combine
    assert_close_to(one_conv, two_conv, noise, factor=4.0, floor=64 * torch.finfo(x.dtype).eps,
                    what="fold")


def test_fold_gradient_of_w2_is_f_times_dw():
    """dW2 = +-f * dW, where dW is the gradient of the combined weight."""
    for combine, sign in (("add", 1.0), ("sub", -1.0)):
        block = make(combine=combine).train()
        x = inputs()
        res = step(block, x)
        # dW: gradient of a plain conv whose weight is the combined weight, same downstream
        w = (block.wq(block.lp_conv.weight) + sign * 0.6 * block.fp_conv.weight).detach()
        w.requires_grad_(True)
        y = block.aq(block.lp_bn(block.conv(x, w)))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        torch.testing.assert_close(res["fp_conv.weight.grad"], sign * 0.6 * w.grad)


def test_fold_at_f_zero_is_the_plain_block():
    block = make().train()
    block.set_f(0.0)
    plain = LowPrecisionConv2d(4, 6, 3, padding=1)
    plain.load_state_dict({k: v for k, v in block.state_dict().items()
                           if not k.startswith(("fp_", "f"))})
    a, b = step(block, inputs()), step(plain, inputs())
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["x.grad"], b["x.grad"])
    assert a["fp_conv.weight.grad"] is None


@pytest.mark.parametrize("kw", [dict(scheme=2), dict(combine="concat", fp_ratio=0.5),
                                dict(fp_activation="relu")])
def test_fold_needs_scheme1_add_sub_no_psi(kw):
    with pytest.raises(ValueError, match="fold"):
        make(**kw)
