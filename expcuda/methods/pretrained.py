"""Start a low-precision (or EXP-Net, or full-precision) model from a full-precision model's weights.

Zhuang et al. start their ImageNet ResNet-18 runs, both models, from
pretrained full-precision weights. expcuda's full-precision network of an
architecture (``mode="fp"``, what ``expcuda train --full-precision`` exports
as ``fp_model.safetensors``) has its convolutions, BatchNorms and last FC in
the same order as the low-precision one, so they are copied by position
(the stem, each LP conv and its BN, the head). EXP-Net's FP branches keep
their own initialisation; learned quantizer scales are re-initialised from
the loaded weights.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from expcuda import models
from expcuda.nn.block import LowPrecisionConv2d

LEAVES = (nn.Conv2d, _BatchNorm, nn.Linear)  # _BatchNorm: a DDP run's synced BatchNorms too


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convs, BatchNorms and Linears in forward order, without EXP-Net's FP branches."""
    skip = ("fp_conv", "fp_bn")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LEAVES) and not n.endswith(skip)]


@torch.no_grad()
def load_full_precision(model: nn.Module, config: models.ModelConfig, path: str) -> int:
    """Copy ``path``'s full-precision weights of ``config``'s architecture into ``model``; the count copied."""
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ValueError(f"--init-from {path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    fp = models.build(config.replace(mode="fp", expand_layers="all"))
    try:
        fp.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--init-from {path}: not the full-precision {config.arch} x{config.width} with "
                         f"{config.num_classes} classes ({str(exc).splitlines()[0]})") from None
    if any(getattr(m, "in_extra", 0) for m in model.modules()):
        raise ValueError("--init-from does not serve --combine concat (its widened layers have no "
                         "full-precision counterpart)")
    ours, theirs = _leaves(model), _leaves(fp)
    if len(ours) != len(theirs):
        raise ValueError(f"--init-from {path}: {len(theirs)} layers to copy, the model has {len(ours)}")
    for (name, dst), (_, src) in zip(ours, theirs):
        kind = next(k for k in LEAVES if isinstance(src, k))
        if not isinstance(dst, kind) or any(a.shape != b.shape for a, b in zip(dst.state_dict().values(),
                                                                                 src.state_dict().values())):
            raise ValueError(f"--init-from {path}: layer {name} does not match the full-precision model's")
        dst.load_state_dict(src.state_dict())
    for m in model.modules():
        if isinstance(m, LowPrecisionConv2d):
            m.wq.init_from(m.lp_conv.weight)
    return len(ours)
