"""``expcuda.export``: a collapsed low-precision model as one bit-packed safetensors file.

The file holds the weight codes as bit planes (``pack_planes``), their gains, the BatchNorm folded
into per-channel thresholds on the integer accumulator (``fold``), and the full-precision first and
last layers as float32 (float16 with ``fp16=True``); its header metadata holds the JSON config
(format ``expcuda-packed``, version 1) that ``load_packed`` checks every tensor against.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from expcuda.deploy import fold
from expcuda.deploy.reference import pack_planes

FORMAT, VERSION = "expcuda-packed", 1


class ExportError(ValueError):
    """The model cannot be exported packed; the message names the layer."""


# --------------------------------------------------------------------------- checks

def check_collapsed(model: nn.Module) -> None:
    """Refuse, naming the layer, a model with an FP branch left or a quantizer switched off."""
    from expcuda.nn import ConcatInput, ExpandedConv2d, LowPrecisionConv2d
    from expcuda.nn.quantizers import ActivationQuantizer, WeightQuantizer

    live = [(n, float(m.f)) for n, m in model.named_modules()
            if isinstance(m, ExpandedConv2d) and m.expanded and float(m.f) != 0.0]
    if live:
        listing = ", ".join(f"layer {n}: f = {f:g}" for n, f in live)
        raise ExportError(f"{listing} is not 0 yet; finish the decay (or set_f(0)), then "
                          "expcuda.collapse(model) before exporting")
    for name, m in model.named_modules():
        if isinstance(m, ExpandedConv2d) and m.expanded:
            raise ExportError(f"layer {name} still has its full-precision branch (f = 0): call "
                              "expcuda.collapse(model) before exporting")
        if isinstance(m, ConcatInput) or (isinstance(m, LowPrecisionConv2d) and m.in_extra):
            raise ExportError(f"layer {name} still takes a concat block's FP channels: call "
                              "expcuda.collapse(model) before exporting")
        if isinstance(m, (WeightQuantizer, ActivationQuantizer)) and not m.enabled:
            raise ExportError(f"layer {name}: the quantizer is switched off (a progressive stage); "
                              "only a fully quantized model can be exported packed")


def _structure(model: nn.Module):
    """(stem modules, LP blocks, fc) of a plain ``stem -> features -> flatten -> fc`` network."""
    from expcuda.models.alexnet import AlexNetBN
    from expcuda.models.svhn import SVHNNet
    from expcuda.models.vgg import VGG16BN
    from expcuda.nn import LowPrecisionConv2d
    from expcuda.nn.quantizers import ActivationQuantizer

    if not isinstance(model, (SVHNNet, VGG16BN, AlexNetBN)):
        raise ExportError(f"{type(model).__name__}: only the plain conv chains (svhn_net, vgg16_bn, "
                          "alexnet_bn) can be exported packed; residual networks are not supported")
    stem = list(model.stem)
    if not (isinstance(stem[0], nn.Conv2d) and isinstance(stem[-2], nn.BatchNorm2d)
            and isinstance(stem[-1], ActivationQuantizer) and len(stem) in (3, 4)):
        raise ExportError("layer stem: expected Conv2d, [MaxPool2d], BatchNorm2d, ActivationQuantizer")
    for i, block in enumerate(model.features):
        if not isinstance(block, LowPrecisionConv2d):
            raise ExportError(f"layer features.{i}: a {type(block).__name__}, not a LowPrecisionConv2d "
                              "(collapse the model first)")
    if not isinstance(model.fc, nn.Linear):
        raise ExportError(f"layer fc: a {type(model.fc).__name__}, not a Linear")
    return stem, list(model.features), model.fc


def _pool_spec(name: str, pool) -> dict | None:
    if pool is None:
        return None
    if not isinstance(pool, nn.MaxPool2d):
        raise ExportError(f"layer {name}: pool {type(pool).__name__} is not supported (only MaxPool2d)")
    return {"kernel_size": pool.kernel_size, "stride": pool.stride, "padding": pool.padding,
            "dilation": pool.dilation, "ceil_mode": bool(pool.ceil_mode)}


def _square(name: str, what: str, value) -> int:
    v = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if isinstance(v[0], str) or v[0] != v[1]:
        raise ExportError(f"layer {name}: {what} {value!r} is not supported packed (one int for both axes)")
    return int(v[0])


def _act_spec(name: str, aq) -> dict:
    if not aq.activation:
        raise ExportError(f"layer {name}: a block without an activation cannot be exported packed")
    step = float(aq.step) if aq.kind == "lsq" else None
    try:
        fold.activation_coding(aq.kind, aq.bits, step)
    except ValueError as exc:
        raise ExportError(f"layer {name}: {exc}") from None
    return {"kind": aq.kind, "bits": int(aq.bits if aq.kind != "sign" else 1), "step": step}


# --------------------------------------------------------------------------- the packed form

@torch.no_grad()
def pack(model: nn.Module, fp16: bool = False) -> tuple[dict, dict]:
    """(config, tensors) of the packed form of a collapsed model; raises ExportError naming the layer."""
    check_collapsed(model)
    stem, blocks, fc = _structure(model)
    fdt = torch.float16 if fp16 else torch.float32
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor, dtype=None):
        tensors[key] = t.detach().to("cpu", dtype or t.dtype).contiguous().clone()

    conv, bn, aq = stem[0], stem[-2], stem[-1]
    if conv.bias is not None:
        put("stem.conv.bias", conv.bias, fdt)
    put("stem.conv.weight", conv.weight, fdt)
    for key in ("weight", "bias", "running_mean", "running_var"):
        put(f"stem.bn.{key}", getattr(bn, key), fdt)
    act = _act_spec("stem", aq)
    cfg_model = getattr(model, "config", None)
    config = {
        "format": FORMAT, "version": VERSION,
        "model_config": cfg_model.to_dict() if cfg_model is not None else None,
        "float_dtype": "float16" if fp16 else "float32",
        "stem": {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                 "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
                 "padding": list(conv.padding), "dilation": list(conv.dilation), "groups": conv.groups,
                 "bias": conv.bias is not None, "pool": _pool_spec("stem", stem[1] if len(stem) == 4 else None),
                 "bn_eps": bn.eps, "act": act},
        "layers": [],
    }
    for i, block in enumerate(blocks):
        name = f"features.{i}"
        config["layers"].append(_pack_block(name, f"layers.{i}", block, act, put))
        act = config["layers"][-1]["act"]
    put("fc.weight", fc.weight, fdt)
    put("fc.bias", fc.bias if fc.bias is not None else torch.zeros(fc.out_features), fdt)
    config["fc"] = {"in_features": fc.in_features, "out_features": fc.out_features, "in_act": act}
    return config, tensors


def _pack_block(name: str, key: str, block, in_act: dict, put) -> dict:
    c = block.lp_conv
    if c.groups != 1 or _square(name, "dilation", c.dilation) != 1:
        raise ExportError(f"layer {name}: groups and dilation must be 1 to be exported packed")
    stride, padding = _square(name, "stride", c.stride), _square(name, "padding", c.padding)
    wq = block.wq
    wvals = wq(c.weight).detach().float().cpu()
    scales = wq.scales if wq.kind == "syq" else None
    step = float(wq.step) if wq.kind == "lsq" else None
    codes, coding, gains, groups = fold.weight_codes(wq.kind, wq.bits, wvals, scales,
                                                     getattr(wq, "granularity", "layer"), step)
    decoded = fold.decoded_weight(codes, coding, gains, groups)
    err = (decoded - wvals.double()).abs().max().item() if wvals.numel() else 0.0
    if not err <= 4 * 2.0**-24 * max(wvals.abs().max().item(), 1e-30):
        raise ExportError(f"layer {name}: the {wq.kind} weight codes do not reproduce the quantized weights "
                          f"(max error {err:g}); this quantizer's output is not on its code grid")
    a_coding, a_gain = fold.activation_coding(in_act["kind"], in_act["bits"], in_act["step"])
    out_act = _act_spec(name, block.aq)
    integer = len(groups) == 1
    o = c.out_channels
    unit = (a_gain * gains[0] if integer else torch.full((o,), a_gain, dtype=torch.float64)).expand(o)
    k, cin = c.kernel_size[0] * c.kernel_size[1], c.in_channels
    bound = fold.accumulator_bound(a_coding, coding, k * cin)
    thr, direction = fold.fold_thresholds(block.lp_bn, out_act["kind"], out_act["bits"], out_act["step"],
                                          unit, integer, big=bound + 1)
    if integer:
        thr = thr.to(torch.int32 if bound + 1 <= fold.INT32_MAX else torch.int64)
    # channels last for pack_planes: [O, KH, KW, C] -> [O, KH, KW, bits, ceil(C/8)]
    put(f"{key}.planes", pack_planes(codes.permute(0, 2, 3, 1).contiguous(), coding.bits))
    same = gains.shape[1] > 1 and bool((gains == gains[:, :1]).all())
    gains = gains[:, :1] if same else gains
    exact32 = bool((gains.float().double() == gains).all())  # the learned scales are float32 numbers
    put(f"{key}.gain", gains.float() if exact32 else gains)
    put(f"{key}.thresholds", thr)
    put(f"{key}.direction", direction)
    return {"name": name, "in_channels": cin, "out_channels": o, "kernel_size": list(c.kernel_size),
            "stride": stride, "padding": padding, "w_quant": wq.kind, "w_bits": coding.bits,
            "w_code": {"mult": coding.mult, "add": coding.add}, "groups": [list(g) for g in groups],
            "a_code": {"bits": a_coding.bits, "mult": a_coding.mult, "add": a_coding.add},
            "integer": integer, "pool": _pool_spec(name, block.pool), "act": out_act}


def float32_bytes(model: nn.Module) -> int:
    """The size of the model's floating-point state (weights and BatchNorm buffers) in float32."""
    return sum(4 * v.numel() for v in model.state_dict().values() if v.is_floating_point())


def serialize(config: dict, tensors: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors, metadata={"format": FORMAT, "version": str(VERSION),
                                   "config": json.dumps(config, sort_keys=True, separators=(",", ":"))})


def export(model: nn.Module, path: str, *, fp16: bool = False, verbose: bool = False) -> dict:
    """Write ``model`` (collapsed, every f == 0) bit-packed to ``path``, atomically; returns the sizes.

    Nothing is written unless the whole model packs and the file reloads to the same tensors.
    """
    from expcuda.deploy.packed_model import from_bytes
    from expcuda.train.atomic import atomic_path

    config, tensors = pack(model, fp16=fp16)
    data = serialize(config, tensors)
    from_bytes(data, path)  # the loader's every check, before anything is on disk
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    ref = float32_bytes(model)
    report = {"path": path, "bytes": len(data), "float32_bytes": ref,
              "ratio": ref / len(data) if data else math.inf}
    if verbose:
        print(f"packed: {path}: {len(data)} bytes; float32 weights {ref} bytes ({report['ratio']:.1f}x smaller)")
    return report
