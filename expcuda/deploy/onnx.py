"""ONNX export of the collapsed float model, checked with onnxruntime.

The quantizers are ``torch.library`` custom ops, which ``torch.onnx.export`` cannot translate, so the
exported graph is the collapsed model rewritten in standard ops: each low-precision convolution holds
its already-quantized weights (``Qw(W)`` as a constant) and each activation quantizer is its
reference math (clip, multiply, Round, divide: ONNX's Round is half-to-even like ``torch.round``).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceActivation(nn.Module):
    """An activation quantizer's forward in plain torch ops (what ONNX can express)."""

    def __init__(self, kind: str, bits: int, step: float | None = None):
        super().__init__()
        self.kind, self.bits, self.step = kind, bits, step

    def forward(self, y):
        if self.kind == "dorefa":
            n = float(2**self.bits - 1)
            return torch.round(torch.clamp(y, 0.0, 1.0) * n) / n
        if self.kind == "sign":
            return (y > 0).to(y.dtype) - (y < 0).to(y.dtype)
        n = float(2**self.bits - 1)
        return torch.round(torch.clamp(torch.relu(y) / self.step, 0.0, n)) * self.step


def _activation(name: str, aq) -> nn.Module:
    if not aq.activation or aq.kind == "none" or (aq.kind == "dorefa" and aq.bits == 32):
        raise ValueError(f"layer {name}: activation {aq.kind!r} ({aq.bits} bits) has no ONNX form here")
    return ReferenceActivation(aq.kind, aq.bits, float(aq.step) if aq.kind == "lsq" else None)


class FrozenConv(nn.Module):
    """A LowPrecisionConv2d in eval mode: conv with its quantized weights, pool, BatchNorm, Qa."""

    def __init__(self, name: str, block):
        super().__init__()
        c = block.lp_conv
        with torch.no_grad():
            self.register_buffer("weight", block.wq(c.weight).detach().float().clone())
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups
        self.pool = copy.deepcopy(block.pool)
        self.bn = copy.deepcopy(block.lp_bn).eval()
        self.act = _activation(name, block.aq)

    def forward(self, x):
        z = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        if self.pool is not None:
            z = self.pool(z)
        return self.act(self.bn(z))


class OnnxNet(nn.Module):
    """stem -> frozen LP convs -> flatten -> fc, in standard ops only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from expcuda.deploy.export import _structure, check_collapsed
        check_collapsed(model)
        stem, blocks, fc = _structure(model)
        self.stem = nn.Sequential(*[copy.deepcopy(m) for m in stem[:-1]], _activation("stem", stem[-1]))
        self.features = nn.Sequential(*[FrozenConv(f"features.{i}", b) for i, b in enumerate(blocks)])
        self.fc = copy.deepcopy(fc)
        self.eval()

    def forward(self, x):
        return self.fc(torch.flatten(self.features(self.stem(x)), 1))


def export_onnx(model: nn.Module, path: str, example: torch.Tensor) -> str:
    """Write the collapsed ``model`` as ONNX to ``path`` (atomically), with a dynamic batch size."""
    from expcuda.train.atomic import atomic_path

    net = OnnxNet(model)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter: the torch.export one needs onnxscript, not in the CI's packages
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (example,), tmp, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def run_onnx(path: str, x: torch.Tensor) -> torch.Tensor:
    """The logits onnxruntime computes for ``x`` (CPU execution provider)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(["logits"], {"images": x.detach().float().numpy()})[0])
