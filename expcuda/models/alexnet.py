"""AlexNet for 224x224 with BatchNorm instead of LRN and no dropout (DoReFa-Net's ImageNet model).

fc6 and fc7 are written as convolutions (6x6 and 1x1 on a 1x1 map), the same
arithmetic as linear layers, so they quantize and expand like every other
low-precision layer; the last FC stays a full-precision Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from expcuda.models.config import ModelConfig
from expcuda.models.layers import LayerFactory


class AlexNetBN(nn.Module):
    """224 -conv 11/4-> 54 -pool-> 27 -conv 5-> 27 -pool-> 14 -conv 3 x3-> 14 -pool-> 6 -fc6-> 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make = LayerFactory(cfg)
        self.stem = make.stem(cfg.in_channels, 96, 11, stride=4, pool=nn.MaxPool2d(3, 2, ceil_mode=True))
        c, blocks = 96, []
        for out, k, pad, pool in ((256, 5, 2, nn.MaxPool2d(3, 2, padding=1)), (384, 3, 1, None),
                                  (384, 3, 1, None), (256, 3, 1, nn.MaxPool2d(3, 2)),
                                  (4096, 6, 0, None), (4096, 1, 0, None)):
            block, c = make.conv(c, out, k, padding=pad, pool=pool)
            blocks.append(block)
        self.features = nn.Sequential(*blocks)
        self.fc = make.head(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(self.stem(x)), 1))
