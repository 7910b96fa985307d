"""The paper's models: shapes, which layers expand, collapse to the baseline's exact topology, JSON config."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import expcuda
from expcuda import models
from expcuda.models import ModelConfig
from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d


def blocks(model, cls):
    return [m for m in model.modules() if type(m) is cls]


def set_f(model, value):
    for b in blocks(model, ExpandedConv2d):
        b.set_f(value)


@pytest.mark.parametrize("width, channels", [(0.5, [32, 32, 64, 64, 64, 256]), (0.125, [8, 8, 16, 16, 16, 64])])
def test_svhn_net_layout(width, channels):
    model = models.svhn_net(width)
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].out_channels == round(48 * width)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == channels[-1]
    lp = blocks(model, ExpandedConv2d)
    assert [b.out_channels for b in lp] == channels and all(b.expanded for b in lp)
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 10)


@pytest.mark.parametrize("arch, options, size, mode", [
    ("vgg16_bn", dict(width=0.125, num_classes=100), 32, "fp"),
    ("vgg16_bn", dict(width=0.125, num_classes=100), 32, "exp"),
    ("preresnet20", dict(width=0.25, num_classes=100), 32, "exp"),
    ("preresnet20", dict(width=0.25, num_classes=100), 32, "lp"),
    ("resnet18", dict(width=0.125, num_classes=7), 32, "lp"),
    ("resnet18", dict(width=0.125, num_classes=7), 32, "exp"),
])
def test_other_archs_forward_backward(arch, options, size, mode):
    model = models.build(ModelConfig(arch=arch, mode=mode, **options))
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, options["num_classes"])
    out.sum().backward()
    counts = {cls: len(blocks(model, cls)) for cls in (ExpandedConv2d, LowPrecisionConv2d)}
    n_lp = {"vgg16_bn": 12, "preresnet20": 18 + 2, "resnet18": 16 + 3}[arch]
    expected = {"fp": (0, 0), "lp": (0, n_lp), "exp": (n_lp, 0)}[mode]
    assert (counts[ExpandedConv2d], counts[LowPrecisionConv2d]) == expected


def test_alexnet_bn_shapes():
    model = models.alexnet_bn(num_classes=10, mode="lp").eval()
    lp = blocks(model, LowPrecisionConv2d)
    assert [b.out_channels for b in lp] == [256, 384, 384, 256, 4096, 4096]
    assert not any(isinstance(m, (nn.Dropout, nn.LocalResponseNorm)) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_partial_expansion_numbers_lp_layers_from_one():
    model = models.svhn_net(0.25, expand_layers="56")
    kinds = [type(m) for m in model.features]
    assert kinds == [LowPrecisionConv2d] * 4 + [ExpandedConv2d] * 2
    assert [type(m) for m in models.svhn_net(0.25, expand_layers="1,3").features][:3] == \
        [ExpandedConv2d, LowPrecisionConv2d, ExpandedConv2d]
    with pytest.raises(ValueError, match="expand_layers must be"):
        ModelConfig(expand_layers="4x")


@pytest.mark.parametrize("arch, options, size", [
    ("svhn_net", dict(width=0.25, combine="add"), 40),
    ("svhn_net", dict(width=0.25, combine="concat", fp_ratio=0.5, scheme=1), 40),
    ("vgg16_bn", dict(width=0.125, combine="sub"), 32),
    ("preresnet20", dict(width=0.25, combine="add", expand_layers="1,2,3,8"), 32),
])
def test_collapse_gives_the_baseline_exactly(arch, options, size):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, **options)
    model = models.build(cfg)
    x = torch.randn(4, 3, size, size)
    model(x).sum().backward()  # one training pass moves BN statistics
    set_f(model, 0.0)
    model.eval()
    with torch.no_grad():
        expanded = model(x)
    expcuda.collapse(model)
    baseline = models.build(ModelConfig.from_json(cfg.replace(mode="lp").to_json())).eval()
    baseline.load_state_dict(model.state_dict())  # strict: the same keys, the same shapes
    with torch.no_grad():
        assert torch.equal(model(x), expanded)
        assert torch.equal(baseline(x), expanded)


def test_concat_widens_the_next_layer_and_the_head():
    model = models.svhn_net(0.25, combine="concat", fp_ratio=0.5)
    first, second = model.features[0], model.features[1]
    assert first.fp_channels == 8 and second.in_extra == 8
    assert isinstance(model.fc, expcuda.nn.ConcatInput) and model.fc.extra == 64
    with pytest.raises(ValueError, match="residual sum"):
        models.preresnet20(0.25, combine="concat", fp_ratio=0.5)


def test_config_json_roundtrip_and_errors():
    cfg = ModelConfig(arch="vgg16_bn", width=0.5, num_classes=100, w_quant="xnor", a_quant="sign", scheme=1)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and again.input_size == 32
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelConfig(arch="lenet")
    with pytest.raises(ValueError, match="fp_ratio must be 1.0"):
        models.svhn_net(0.25, fp_ratio=0.5)


@pytest.mark.parametrize("quant, field, fixed", [("xnor", "w_bits", 1), ("sign", "a_bits", 1), ("none", "a_bits", 32)])
def test_a_fixed_width_quantizer_records_its_own_bits(quant, field, fixed):
    kind = "w_quant" if field == "w_bits" else "a_quant"
    cfg = ModelConfig(**{kind: quant})
    assert getattr(cfg, field) == fixed
    # a config written before the rule recorded the shared default 2, which these ignore: it still loads
    old = json.loads(ModelConfig(**{kind: quant}).to_json())
    old[field] = 2
    assert getattr(ModelConfig.from_dict(old), field) == fixed
    with pytest.raises(ValueError, match=f"{field}=4: {quant} has no bit-width"):
        ModelConfig(**{kind: quant, field: 4})


def test_an_unfixed_quantizer_keeps_the_default_and_given_bits():
    assert ModelConfig().w_bits == 2 and ModelConfig().a_bits == 2
    assert ModelConfig(w_bits=4, a_bits=8).w_bits == 4
