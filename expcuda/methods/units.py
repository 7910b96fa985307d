"""The quantizable units of a model: what stochastic precision samples and progressive stages convert.

A *layer* unit is one low-precision convolution (its weight quantizer and its
output's activation quantizer) or one activation quantizer standing alone
(the stem's, a pre-activation's). A *block* unit is every quantizer inside
one residual block (``PreActBlock``, ``BasicBlock``); quantizers outside any
block stay layer units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from expcuda.nn.block import LowPrecisionConv2d
from expcuda.nn.quantizers import ActivationQuantizer, WeightQuantizer

UNITS = ("layer", "block")


@dataclass
class Unit:
    """One switchable group of quantizers, with the weights its weight quantizers quantize."""

    name: str
    quantizers: list = field(default_factory=list)
    weights: list = field(default_factory=list)  # (WeightQuantizer, weight Parameter) pairs

    def set_skip(self, skip: bool) -> None:
        """Full precision in training mode (``skip``) or quantized."""
        for q in self.quantizers:
            q.skip_in_training = skip

    @torch.no_grad()
    def weight_error(self) -> float | None:
        """Mean relative quantization error of its weights, None without any: ||w - a*Q(w)|| / ||w||
        at the best scale a (= sin of the angle between w and Q(w)), so that quantizers whose levels
        are not on w's scale (DoReFa's [-1, 1]) are measured by what they lose, not by their scale."""
        errors = []
        for wq, w in self.weights:
            saved, wq.skip_in_training = wq.skip_in_training, False
            try:
                q = wq(w)
            finally:
                wq.skip_in_training = saved
            cos = F.cosine_similarity(q.flatten().double(), w.flatten().double(), dim=0, eps=1e-30)
            errors.append(float((1 - cos.clamp(-1, 1) ** 2).clamp_min(0).sqrt()))
        return sum(errors) / len(errors) if errors else None


def _block_types() -> tuple:
    from expcuda.models.resnet import BasicBlock, PreActBlock
    return (PreActBlock, BasicBlock)


def layer_units(model: nn.Module) -> list[Unit]:
    """Every low-precision conv and every free-standing activation quantizer, in module order."""
    units, owned = [], set()
    for name, m in model.named_modules():
        if isinstance(m, LowPrecisionConv2d):
            weights = [(m.wq, m.lp_conv.weight)] + ([(m.wq, m.lp_extra)] if m.lp_extra is not None else [])
            units.append(Unit(name, [m.wq, m.aq], weights))
            owned.update((id(m.wq), id(m.aq)))
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer) and id(m) not in owned and m.kind != "none":
            units.append(Unit(name, [m]))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(units, key=lambda u: order[u.name])


def units(model: nn.Module, kind: str = "layer") -> list[Unit]:
    """The model's units of ``kind`` ('layer' or 'block'); raises when it has none of that kind."""
    if kind not in UNITS:
        raise ValueError(f"sp_unit must be one of {', '.join(UNITS)}, got {kind!r}")
    layers = layer_units(model)
    if not layers:
        raise ValueError("the model has no quantizers (a full-precision model): nothing to quantize stochastically")
    if kind == "layer":
        return layers
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, _block_types())]
    if not blocks:
        raise ValueError("--sp-unit block needs a model with residual blocks (preresnet20, resnet18); this "
                         "model has none: use --sp-unit layer")
    grouped, result = {}, []
    for u in layers:
        owner = next((b for b, _ in blocks if u.name.startswith(b + ".")), None)
        if owner is None:
            result.append(u)
        elif owner not in grouped:
            grouped[owner] = Unit(owner, list(u.quantizers), list(u.weights))
            result.append(grouped[owner])
        else:
            grouped[owner].quantizers += u.quantizers
            grouped[owner].weights += u.weights
    return result


def weight_quantizers(model: nn.Module):
    """(weight quantizer, the weight it initialises from) for every low-precision conv."""
    return [(m.wq, m.lp_conv.weight) for m in model.modules() if isinstance(m, LowPrecisionConv2d)]


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.kind != "none"]


def set_quantized(model: nn.Module, weights: bool = True, activations: bool = True) -> nn.Module:
    """Switch every weight / activation quantizer on or off (off: the full-precision form)."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActivationQuantizer):
            m.enabled = activations
    return model
