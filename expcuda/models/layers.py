"""Layer factory: turns a ModelConfig into the networks' layers, numbering the LP convolutions.

Every architecture asks the factory for its layers in forward order, so one
config decides for all of them which layers are full precision (the first
conv and the last FC always are), which low-precision layers expand, and how
they quantize. Layers that do not expand are ``LowPrecisionConv2d``, the
very class ``expcuda.collapse`` leaves behind, so a collapsed EXP-Net and
the baseline built from the same config have identical state_dict keys.
"""

from __future__ import annotations

from torch import nn

from expcuda.models.config import ModelConfig


def scaled(channels: int, width: float) -> int:
    """A width-scaled channel count, at least 1."""
    return max(1, int(round(channels * width)))


class LayerFactory:
    """Hands out the layers of one model in forward order.

    It counts LP convolutions (conv 0 is the full-precision first one, so
    "456" means the same layers as ``expcuda.expand(layers="456")``) and
    remembers a concat block until the next layer is made, which it widens
    to take the FP channels.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.lp_layers = 0
        self.pending = None  # a concat ExpandedConv2d whose consumer is not built yet

    def width(self, channels: int) -> int:
        return scaled(channels, self.cfg.width)

    def act(self) -> nn.Module:
        """``phi`` + ``Qa`` as a module (ReLU in full precision)."""
        if self.cfg.mode == "fp":
            return nn.ReLU(inplace=True)
        from expcuda.nn.quantizers import ActivationQuantizer
        return ActivationQuantizer(self.cfg.a_quant, self.cfg.a_bits)

    def stem(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
             pool: nn.Module | None = None) -> nn.Sequential:
        """The full-precision first conv: conv, optional pool, BN (the blocks' order: BN then runs on the
        pooled map, 4x cheaper), then the activation, quantized like every LP layer's so the first LP
        layer sees a low-precision input."""
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)]
        if pool is not None:
            layers.append(pool)
        return nn.Sequential(*layers, nn.BatchNorm2d(cout), self.act())

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
             pool: nn.Module | None = None, activation: bool = True) -> tuple[nn.Module, int]:
        """The next low-precision layer: conv, [pool], BN, activation and Qa (BN last when
        ``activation=False``), expanded when the config says so. Returns it and ``cout``."""
        from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d

        self.lp_layers += 1
        cfg = self.cfg
        if cfg.mode == "fp":
            layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)]
            layers += [pool] if pool is not None else []
            layers += [nn.BatchNorm2d(cout)] + ([nn.ReLU(inplace=True)] if activation else [])
            return nn.Sequential(*layers), cout
        common = dict(w_quant=cfg.w_quant, w_bits=cfg.w_bits, a_quant=cfg.a_quant if activation else "none",
                      a_bits=cfg.a_bits, pool=pool, activation=activation)
        if cfg.expands(self.lp_layers):
            if not activation and cfg.combine == "concat":
                raise ValueError(f"combine='concat' cannot expand LP layer {self.lp_layers} of {cfg.arch}: its "
                                 "output meets a residual sum, which needs the original channel count; use "
                                 "add or sub, or leave the layer out of expand_layers")
            block = ExpandedConv2d(cin, cout, kernel_size, stride, padding, scheme=cfg.scheme,
                                   combine=cfg.combine, fp_ratio=cfg.fp_ratio, fp_activation=cfg.fp_activation,
                                   **common)
        else:
            block = LowPrecisionConv2d(cin, cout, kernel_size, stride, padding, **common)
        self._feed(block)
        if isinstance(block, ExpandedConv2d) and cfg.combine == "concat":
            self.pending = block
        return block, cout

    def head(self, cin: int, classes: int) -> nn.Module:
        """The full-precision last FC (taking a concat block's FP channels too while they live)."""
        fc = nn.Linear(cin, classes)
        return self._feed(fc)

    def _feed(self, layer: nn.Module) -> nn.Module:
        """Widen ``layer`` for the FP channels of the concat block just before it, if any."""
        producer, self.pending = self.pending, None
        if producer is None:
            return layer
        if isinstance(layer, nn.Linear):
            from expcuda.nn import ConcatInput
            return ConcatInput(layer, producer.fp_channels, producer)
        layer.widen_input(producer.fp_channels, producer)
        return layer
