"""The quantizers of METHODS.md, each with its straight-through backward.

Every function checks its arguments, then calls a ``torch.library`` custom op
(``torch.ops.expcuda.*``) that runs on the backend chosen for the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from expcuda import _checks
from expcuda._custom import apply
from expcuda.quant import ops

GRANULARITY_RANK = {"pixel": 2, "row": 1, "layer": 0}

__all__ = ["dorefa_weight", "dorefa_activation", "xnor_weight", "sign_activation",
           "syq_weight", "lsq"]


def dorefa_activation(x: Tensor, bits: int) -> Tensor:
    """DoReFa activations: ``round(n * clip(x, 0, 1)) / n``; ``bits=32`` returns ``x``."""
    _checks.float_tensor("x", x)
    _checks.integer("bits", bits, 1, 8, extra=(32,))
    if bits == 32:
        return x
    return apply(ops.dorefa_activation_op, x, bits)[0]


def sign_activation(x: Tensor) -> Tensor:
    """``sign(x)`` with the STE ``dx = dy * [|x| <= 1]`` (BNN / XNOR-Net activations)."""
    _checks.float_tensor("x", x)
    return apply(ops.sign_activation_op, x)[0]


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights: the tanh form for ``bits >= 2``, ``sign(w) * mean|w|`` for 1."""
    _checks.float_tensor("w", w)
    _checks.integer("bits", bits, 1, 8)
    return apply(ops.dorefa_weight_op, w, bits)


def xnor_weight(w: Tensor) -> Tensor:
    """XNOR-Net weights: ``sign(w)`` times each output filter's ``mean|w|``."""
    _checks.float_tensor("w", w)
    _checks.rank("w", w, (2, 4), "(out, in) or (out, in, kh, kw): the scale is per output filter")
    return apply(ops.xnor_weight_op, w)


def syq_weight(w: Tensor, scales: Tensor, eta: float = 0.0, granularity: str = "pixel") -> Tensor:
    """SYQ weights: binary (``eta=0``) or ternary, with learned scales per pixel, row or layer."""
    _checks.float_tensor("w", w)
    _checks.float_tensor("scales", scales)
    _checks.choice("granularity", granularity, GRANULARITY_RANK)
    _checks.same_device(w=w, scales=scales)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must be a float in [0, 1), got {eta!r}")
    if granularity == "layer":
        expected = ()
    else:
        _checks.rank("w", w, (4,), f"(out, in, kh, kw) for granularity {granularity!r}")
        expected = tuple(w.shape[2:]) if granularity == "pixel" else (w.shape[2],)
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales must have shape {expected} for granularity {granularity!r} "
                         f"and w of shape {tuple(w.shape)}, got {tuple(scales.shape)}")
    return apply(ops.syq_weight_op, w, scales, float(eta), granularity)


def lsq(x: Tensor, step: Tensor, bits: int, signed: bool = False) -> Tensor:
    """LSQ: ``round(clip(x / s, Qn, Qp)) * s`` with a learned positive scalar step ``s``."""
    _checks.float_tensor("x", x)
    _checks.float_tensor("step", step)
    _checks.integer("bits", bits, 2 if signed else 1, 8)
    _checks.same_device(x=x, step=step)
    if step.numel() != 1:
        raise ValueError(f"step must be a positive scalar tensor, got shape {tuple(step.shape)}")
    if step.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(step.detach() > 0):
        raise ValueError(f"step must be a positive scalar tensor, got {step.item()}")
    return apply(ops.lsq_op, x, step, bits, bool(signed))
