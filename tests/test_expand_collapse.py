"""expand / collapse on torchvision-style models: partial expansion, concat, exact collapse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from expcuda import collapse, expand
from expcuda.nn import ConcatInput, ExpandedConv2d, LowPrecisionConv2d
from tests.test_expand_models import TinyResNet, TinyVGG


def blocks(model, cls=ExpandedConv2d):
    return [m for m in model.modules() if type(m) is cls]


def train_a_little(model, x, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def finish_decay(model):
    for b in blocks(model):
        b.set_f(0.0)


X = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options", [
    dict(), dict(combine="concat", fp_ratio=0.5), dict(scheme=1, combine="sub"),
    dict(combine="concat", fp_ratio=1.0, w_quant="xnor", a_quant="sign"),
    dict(fold=True, scheme=1), dict(w_quant="syq", a_quant="lsq", combine="concat", fp_ratio=0.25),
])
def test_vgg_collapse_is_exact(options):
    torch.manual_seed(0)
    model = expand(TinyVGG(), **options)
    assert len(blocks(model)) == 4  # conv1..conv4; conv0 stays full precision
    assert type(model.features[0]) is nn.Conv2d
    train_a_little(model, X)
    finish_decay(model)
    train_a_little(model, X, steps=1)  # a step at f == 0 too
    model.eval()
    expected = model(X)
    collapsed = collapse(copy.deepcopy(model))
    assert not blocks(collapsed) and not any(isinstance(m, ConcatInput) for m in collapsed.modules())
    assert torch.equal(collapsed(X), expected)
    # exactly the plain low-precision network: same parameter shapes as expand(layers=[])
    plain = expand(TinyVGG(), layers=[], **{k: v for k, v in options.items()
                                           if k in ("w_quant", "a_quant")})
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(collapsed) == shapes(plain)
    plain.load_state_dict(collapsed.state_dict())
    assert torch.equal(plain.eval()(X), expected)


def test_concat_widens_the_consumers():
    model = expand(TinyVGG(), combine="concat", fp_ratio=0.5)
    feats = model.features
    widened = [m for m in feats if isinstance(m, ExpandedConv2d) and m.in_extra]
    assert [m.in_extra for m in widened] == [4, 8, 8]
    head = model.classifier[0]
    assert isinstance(head, ConcatInput) and head.extra == 8 * 4  # 8 FP channels x 2x2 after pooling
    model.train()
    y = model(X)
    y.sum().backward()
    assert head.extra_weight.grad is not None and widened[0].lp_extra.grad is not None


def test_expand_copies_weights_and_f_zero_equals_lp_model():
    torch.manual_seed(0)
    original = TinyVGG()
    train_a_little(original, X)  # non-trivial BN statistics
    expanded = expand(copy.deepcopy(original), combine="concat", fp_ratio=0.5)
    lp = expand(copy.deepcopy(original), layers=[])
    assert len(blocks(lp)) == 0 and len(blocks(lp, LowPrecisionConv2d)) == 4
    b = blocks(expanded)[0]
    conv, bn = original.features[3], original.features[4]
    assert torch.equal(b.lp_conv.weight, conv.weight) and torch.equal(b.lp_bn.running_var, bn.running_var)
    finish_decay(expanded)
    assert torch.equal(expanded.eval()(X), lp.eval()(X))


def test_partial_expansion():
    model = expand(TinyVGG(), layers="34")
    kinds = [type(m).__name__ for m in model.features if not isinstance(m, (nn.Identity, nn.MaxPool2d))]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "LowPrecisionConv2d", "LowPrecisionConv2d",
                     "ExpandedConv2d", "ExpandedConv2d"]
    named = expand(TinyVGG(), layers=["features.7"])
    assert isinstance(named.features[7], ExpandedConv2d) and len(blocks(named)) == 1


def test_pool_inside_the_chain_moves_into_the_block():
    model = expand(TinyVGG(pool_inside=True))
    first = blocks(model)[0]
    assert isinstance(first.pool, nn.MaxPool2d)
    model.train()(X).sum().backward()


def test_resnet_expand_and_collapse():
    torch.manual_seed(0)
    model = expand(TinyResNet())
    convs = blocks(model)
    assert len(convs) == 6  # conv1 and conv2 of three BasicBlocks
    assert [b.aq.activation for b in convs] == [True, False] * 3
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)  # the shortcut stays full precision
    train_a_little(model, X)
    finish_decay(model)
    model.eval()
    expected = model(X)
    assert torch.equal(collapse(model)(X), expected)


def test_resnet_refuses_concat_and_sign():
    with pytest.raises(ValueError, match="residual"):
        expand(TinyResNet(), combine="concat", fp_ratio=0.5)
    with pytest.raises(ValueError, match="a_quant"):
        expand(TinyResNet(), a_quant="sign")


def test_expand_existing_low_precision_blocks():
    torch.manual_seed(0)
    lp = expand(TinyVGG(), layers=[])
    lp_copy = copy.deepcopy(lp)
    model = expand(lp, layers=[3, 4])
    assert len(blocks(model)) == 2
    finish_decay(model)
    assert torch.equal(model.eval()(X), lp_copy.eval()(X))


def test_collapse_refuses_while_f_nonzero():
    model = expand(TinyVGG())
    blocks(model)[1].set_f(0.0)
    blocks(model)[0].set_f(0.3)
    with pytest.raises(RuntimeError, match=r"f == 0.*features\.3 \(f=0\.3\)"):
        collapse(model)


def test_bad_layers():
    with pytest.raises(ValueError, match="layers"):
        expand(TinyVGG(), layers=[0])
    with pytest.raises(ValueError, match="layers"):
        expand(TinyVGG(), layers=[42])
    with pytest.raises(ValueError, match="layers"):
        expand(TinyVGG(), layers=["nope"])
    with pytest.raises(ValueError, match="combine"):
        expand(TinyVGG(), combine="mul")


def _hand_built_concat_pair():
    from expcuda import ExpandedConv2d
    torch.manual_seed(0)
    first = ExpandedConv2d(4, 6, 3, padding=1, combine="concat", fp_ratio=0.5)
    second = ExpandedConv2d(6 + first.fp_channels, 6, 3, padding=1, combine="concat", fp_ratio=0.5)
    return nn.Sequential(first, second)


@pytest.mark.parametrize("last_f", [0.0, None])
def test_collapse_refuses_an_unlinked_concat_consumer_and_leaves_the_model_whole(last_f):
    """A hand-built concat chain: refused at collapse time, naming the layer; nothing half-collapsed."""
    model = _hand_built_concat_pair().eval()
    for block in model:
        block.set_f(0.0)
    x = torch.randn(2, 4, 5, 5)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"concat block\(s\) 0(, 1)? .*widen_input"):
        collapse(model)
    assert [type(m).__name__ for m in model] == ["ExpandedConv2d", "ExpandedConv2d"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)


def test_collapse_of_a_hand_linked_concat_consumer_is_exact():
    """The remedy the refusal names: widen_input on the consumer, then collapse is exact."""
    from expcuda import ExpandedConv2d
    torch.manual_seed(0)
    first = ExpandedConv2d(4, 6, 3, padding=1, combine="concat", fp_ratio=0.5)
    second = ExpandedConv2d(6, 5, 3, padding=1, combine="add")
    second.widen_input(first.fp_channels, first)
    model = nn.Sequential(first, second).eval()
    for block in model:
        block.set_f(0.0)
    x = torch.randn(2, 4, 5, 5)
    before = model(x)
    small = collapse(model)
    assert torch.equal(small(x), before)
