"""expcuda.export / expcuda.load_packed: the packed model reproduces the collapsed one.

Codes are compared bit for bit. The packed model's accumulator is exact (integer, or float64 for
SYQ's per-position scales) while the collapsed model sums float32 products, so a code may differ
only where the collapsed model's own BatchNorm input lies within its float32 error bound of a step
(``deploy_helpers.near_step`` derives the bound). The FP first and last layers run the collapsed
model's float ops on the same values, so logits are equal bit for bit wherever all codes are.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import expcuda
from expcuda import models
from expcuda.deploy import fold
from expcuda.deploy.export import ExportError, pack
from expcuda.deploy.packed_model import PackedFormatError, PackedModel
from tests import deploy_helpers as h

TRAINED = dict(w_bits=2, a_bits=2)  # the paper's default, trained 300 steps in the test
QUANTS = {  # on real images with BatchNorm statistics from real images, untrained weights
    "dorefa-w1a1": dict(w_bits=1, a_bits=1),
    "xnor-sign": dict(w_quant="xnor", w_bits=1, a_quant="sign", a_bits=1),
}
ODD = {  # untrained, width 0.3: 14, 19, 38, 154 channels (not multiples of 8)
    "dorefa-w3a4": dict(w_bits=3, a_bits=4),
    "syq-pixel-w2a2": dict(w_quant="syq", w_bits=2, a_bits=2),
    "syq-row-w1a2": dict(w_quant="syq", w_bits=1, a_bits=2, granularity="row"),
    "syq-layer-w2-sign": dict(w_quant="syq", w_bits=2, a_quant="sign", a_bits=1, granularity="layer"),
    "lsq-w3a2": dict(w_quant="lsq", w_bits=3, a_quant="lsq", a_bits=2),
    "xnor-a8": dict(w_quant="xnor", w_bits=1, a_bits=8),
}


def _in_max(aq) -> float:
    return float(aq.step) * (2**aq.bits - 1) if aq.kind == "lsq" else 1.0


def _check_layers(model, packed, x):
    """Teacher-forced: each packed layer fed the collapsed model's input codes gives its output codes,
    except within the float32 bound of a step; returns the number of such exceptions."""
    codes, pre, _ = h.collapsed_trace(model, x)
    assert torch.equal(packed.stem_codes(x), codes[0])  # the same float ops on the same input
    allowed = 0
    for i, (layer, block) in enumerate(zip(packed.layers, model.features)):
        got = layer(codes[i])
        assert got.shape == codes[i + 1].shape and got.dtype == torch.uint8
        differ = got != codes[i + 1]
        if differ.any():
            prev = model.stem[-1] if i == 0 else model.features[i - 1].aq
            near = h.near_step(block, pre[i], _in_max(prev))
            assert not (differ & ~near).any(), f"layer {i}: codes differ away from every step"
            allowed += int(differ.sum())
    return allowed


def _check_model(model, x, tmp_path):
    """export -> load_packed -> the collapsed model's codes, logits and predictions on x."""
    path = str(tmp_path / "m.packed.safetensors")
    report = expcuda.export(model, path)
    assert os.path.getsize(path) == report["bytes"]
    packed = expcuda.load_packed(path)
    assert _check_layers(model, packed, x) <= 1e-4 * 256 * 2000
    with torch.no_grad():
        want = model(x)
        got = packed(x)
    codes_ref, _, _ = h.collapsed_trace(model, x)
    codes_got = packed.codes(x)
    same = torch.ones(len(x), dtype=torch.bool)
    for a, b in zip(codes_ref, codes_got):
        same &= (a == b).flatten(1).all(1)
    assert same.float().mean() >= 0.99
    assert torch.equal(got[same], want[same])  # bit for bit where every code agrees
    assert torch.equal(got.argmax(1), want.argmax(1))
    return want


@h.needs_fmnist
def test_trained_model_reproduced_on_fmnist(tmp_path):
    model = h.trained(**TRAINED)
    x, y = h.test_images(256)
    want = _check_model(model, x, tmp_path)
    assert (want.argmax(1) == y).float().mean() > 0.4  # trained (chance is 0.1), not a constant model


@h.needs_fmnist
@pytest.mark.parametrize("name", list(QUANTS))
def test_other_quantizers_reproduced_on_fmnist_images(name, tmp_path):
    model = h.calibrated(0.125, real=True, **QUANTS[name])
    x, _ = h.test_images(256)
    _check_model(model, x, tmp_path)


@pytest.mark.parametrize("name", list(ODD))
def test_odd_channels_every_quantizer(name, tmp_path):
    model = h.calibrated(0.3, **ODD[name])
    x = torch.randn(8, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "m.packed.safetensors")
    expcuda.export(model, path)
    packed = expcuda.load_packed(path)
    assert [layer.spec["in_channels"] for layer in packed.layers][:3] == [14, 19, 19]
    assert _check_layers(model, packed, x) <= 1e-4 * x.numel() * 100
    if name.startswith("syq-pixel"):
        assert not packed.layers[0].spec["integer"] and len(packed.layers[0].spec["groups"]) == 9


@torch.no_grad()
def test_vgg16_bn_pools_after_the_block(tmp_path):
    torch.manual_seed(0)
    model = models.vgg16_bn(0.1, mode="lp", w_bits=2, a_bits=2)  # 6..51 channels
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None
    model.train()
    for _ in range(2):
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    path = str(tmp_path / "vgg.safetensors")
    expcuda.export(model, path)
    packed = expcuda.load_packed(path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    assert _check_layers(model, packed, x) <= 10
    assert sum(layer.spec["pool"] is not None for layer in packed.layers) == 5  # after convs 2, 4, 7, 10, 13


def test_one_bit_svhn_quarter_is_15x_smaller(tmp_path):
    for options in (dict(w_bits=1, a_bits=1), dict(w_quant="xnor", w_bits=1, a_quant="sign", a_bits=1)):
        model = models.svhn_net(0.25, mode="lp", **options).eval()
        path = str(tmp_path / "m.packed.safetensors")
        report = expcuda.export(model, path)
        f32 = sum(4 * v.numel() for v in model.state_dict().values() if v.is_floating_point())
        assert report["float32_bytes"] == f32
        assert report["ratio"] == f32 / os.path.getsize(path) >= 15, report


@h.needs_fmnist
def test_fp16_halves_the_float_layers(tmp_path):
    model = h.calibrated(0.125, real=True, w_bits=1, a_bits=1)
    p32, p16 = str(tmp_path / "a"), str(tmp_path / "b")
    r32, r16 = expcuda.export(model, p32), expcuda.export(model, p16, fp16=True)
    stem_fc = sum(v.numel() for k, v in model.state_dict().items() if k.startswith(("stem", "fc"))
                  and v.is_floating_point())
    assert r32["bytes"] - r16["bytes"] >= 2 * stem_fc - 64  # 2 bytes saved per float (header aside)
    packed = expcuda.load_packed(p16)
    assert packed.config["float_dtype"] == "float16"
    x, _ = h.test_images(128)
    codes, _, _ = h.collapsed_trace(model, x)
    # float16 moves the first layer's weights by up to 2**-11 relative: a few of its codes flip
    assert (packed.stem_codes(x) == codes[0]).float().mean() >= 0.99


# --------------------------------------------------------------------------- the fold, exhaustively

@pytest.mark.parametrize("kind,bits", [("dorefa", 1), ("dorefa", 2), ("dorefa", 4), ("sign", 1), ("lsq", 3)])
@pytest.mark.parametrize("integer", [True, False])
def test_thresholds_equal_batchnorm_then_quantizer(kind, bits, integer):
    """Every accumulator value in a range, every sign of gamma (and 0), against the float64 formula."""
    gen = torch.Generator().manual_seed(3)
    o = 11
    bn = torch.nn.BatchNorm2d(o).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(o, generator=gen) * 5)
        bn.running_var.copy_(torch.rand(o, generator=gen) * 4 + 0.1)
        bn.weight.copy_(torch.randn(o, generator=gen))
        bn.weight[3] = 0.0
        bn.weight[4] = -0.0
        bn.bias.copy_(torch.randn(o, generator=gen) * 0.5)
        bn.bias[5] = 0.3
    step = 0.37 if kind == "lsq" else None
    unit = torch.rand(o, generator=gen, dtype=torch.float64) * 0.2 + 0.05
    unit[6] = 0.0  # an all-zero filter: a constant output
    thr, direction = fold.fold_thresholds(bn, kind, bits, step, unit, integer, big=10**6)
    v = torch.arange(-200, 201, dtype=torch.float64) + (0.0 if integer else 0.123)
    z = unit[:, None] * v[None, :]
    k = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    y = (z - bn.running_mean.double()[:, None]) * k[:, None] + bn.bias.double()[:, None]
    if kind == "sign":
        want = (y > 0).long()
    elif kind == "dorefa":
        want = torch.round(y.clamp(0, 1) * (2**bits - 1)).long()
    else:
        want = torch.round((y.clamp_min(0) / step).clamp(0, 2**bits - 1)).long()
    got = (direction.double()[:, None, None] * v[None, :, None] >= thr[:, None, :]).sum(-1)
    assert torch.equal(got, want)
    assert (thr[:, 1:] >= thr[:, :-1]).all()


@pytest.mark.parametrize("kind,bits,gran", [("dorefa", 1, None), ("dorefa", 2, None), ("dorefa", 5, None),
                                            ("xnor", 1, None), ("syq", 1, "pixel"), ("syq", 2, "row"),
                                            ("syq", 2, "layer"), ("lsq", 4, None)])
def test_weight_codes_decode_to_the_quantized_weights(kind, bits, gran):
    from expcuda.nn.quantizers import WeightQuantizer
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(7, 13, 3, 3, generator=gen)
    wq = WeightQuantizer(kind, bits, (3, 3), **({"granularity": gran} if gran else {}))
    wq.init_from(w)
    if kind == "syq":
        with torch.no_grad():
            wq.scales.copy_(torch.randn(wq.scales.shape, generator=gen))  # negative scales too
    vals = wq(w).detach()
    scales = wq.scales if kind == "syq" else None
    step = float(wq.step.detach()) if kind == "lsq" else None
    codes, coding, gains, groups = fold.weight_codes(kind, bits, vals, scales, gran or "layer", step)
    assert int(codes.max()) < 2**coding.bits
    assert torch.allclose(fold.decoded_weight(codes, coding, gains, groups), vals.double(), rtol=0,
                          atol=4 * 2.0**-24 * float(vals.abs().max()))


def test_binary_weights_with_an_exact_zero_are_coded_ternary():
    w = torch.randn(4, 5, 3, 3)
    w[1, 2, 0, 0] = 0.0
    vals = expcuda.quant.xnor_weight(w)
    codes, coding, gains, groups = fold.weight_codes("xnor", 1, vals)
    assert coding.bits == 2 and codes[1, 2, 0, 0] == 1
    assert torch.equal(fold.decoded_weight(codes, coding, gains, groups).float(), vals)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("combine", ["add", "concat"])
def test_refuses_until_collapsed_naming_the_layer(tmp_path, combine):
    options = dict(combine="concat", fp_ratio=0.5) if combine == "concat" else {}
    model = models.svhn_net(0.125, in_channels=1, mode="exp", **options).eval()
    path = tmp_path / "m.packed.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match=r"layer features\.0: f = 1, layer features\.1: f = 1, .* is not 0"):
        expcuda.export(model, str(path))
    for m in model.modules():
        if isinstance(m, expcuda.ExpandedConv2d):
            m.set_f(0.0)
    model.features[3].set_f(0.25)
    with pytest.raises(ExportError, match=r"features\.3: f = 0\.25"):
        expcuda.export(model, str(path))
    model.features[3].set_f(0.0)
    with pytest.raises(ExportError, match=r"features\.0 still has its full-precision branch"):
        expcuda.export(model, str(path))
    assert path.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["m.packed.safetensors"]
    expcuda.collapse(model)
    expcuda.export(model, str(path))
    packed = expcuda.load_packed(str(path))
    assert isinstance(packed, PackedModel)
    x = torch.randn(4, 1, 40, 40, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_refuses_residual_nets_full_precision_activations_and_switched_off_quantizers():
    with pytest.raises(ExportError, match="residual"):
        pack(models.preresnet20(0.25, mode="lp").eval())
    with pytest.raises(ExportError, match="layer stem: activation quantizer 'dorefa' with 32 bits has no integer code"):
        pack(models.svhn_net(0.125, mode="lp", a_bits=32).eval())
    model = h.calibrated(0.125)
    model.features[2].wq.enabled = False
    with pytest.raises(ExportError, match=r"features\.2\.wq: the quantizer is switched off"):
        pack(model)


def _rewrite(path: str, out: str, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(path, "pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(path)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, out, metadata=meta)


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("packed") / "m.packed.safetensors")
    expcuda.export(h.calibrated(0.125, w_bits=2, a_bits=2), path)
    return path


def test_another_format_version_is_refused(packed_file, tmp_path):
    bad = str(tmp_path / "v2.safetensors")
    _rewrite(packed_file, bad, edit_meta=lambda m: m.update(version="2"))
    with pytest.raises(PackedFormatError, match=r"v2\.safetensors: expcuda-packed version '2' is not supported"):
        expcuda.load_packed(bad)
    _rewrite(packed_file, bad, edit_meta=lambda m: m.update(format="expcuda-model"))
    with pytest.raises(PackedFormatError, match="format 'expcuda-model' is not 'expcuda-packed'"):
        expcuda.load_packed(bad)


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_a_truncated_file_is_refused(packed_file, tmp_path, keep):
    data = open(packed_file, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(PackedFormatError, match=r"cut\.safetensors: not a complete safetensors file"):
        expcuda.load_packed(str(bad))


def test_a_config_whose_shapes_do_not_match_is_refused(packed_file, tmp_path):
    bad = str(tmp_path / "shapes.safetensors")

    def widen(meta):
        cfg = json.loads(meta["config"])
        cfg["layers"][2]["out_channels"] += 1
        meta["config"] = json.dumps(cfg)

    _rewrite(packed_file, bad, edit_meta=widen)
    with pytest.raises(PackedFormatError, match=r"shapes\.safetensors: .*features\.3 takes 16 channels but "
                                                r"the layer before gives 17"):
        expcuda.load_packed(bad)

    def fewer_levels(meta):
        cfg = json.loads(meta["config"])
        cfg["layers"][1]["act"]["bits"] = 3
        meta["config"] = json.dumps(cfg)

    _rewrite(packed_file, bad, edit_meta=fewer_levels)
    with pytest.raises(PackedFormatError, match=r"tensor layers\.1\.thresholds is int32 \[8, 3\] but the config "
                                                r"implies int32 or int64 \[8, 7\]"):
        expcuda.load_packed(bad)
    _rewrite(packed_file, bad, edit_tensors=lambda t: t.pop("layers.4.thresholds"))
    with pytest.raises(PackedFormatError, match=r"missing: layers\.4\.thresholds"):
        expcuda.load_packed(bad)
    _rewrite(packed_file, bad, edit_tensors=lambda t: t.update({"fc.weight": t["fc.weight"].double()}))
    with pytest.raises(PackedFormatError, match=r"fc\.weight is float64"):
        expcuda.load_packed(bad)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(PackedFormatError, match="nope.safetensors: cannot read it"):
        expcuda.load_packed(str(tmp_path / "nope.safetensors"))


def test_the_config_names_format_and_version():
    config, tensors = pack(h.calibrated(0.125))
    assert config["format"] == "expcuda-packed" and config["version"] == 1
    assert tensors["layers.0.planes"].shape == (8, 3, 3, 2, 1)  # 8 outputs, 3x3, 2 bits, 6 inputs in 1 byte
