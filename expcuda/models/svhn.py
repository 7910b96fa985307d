"""DoReFa-Net's SVHN model: 7 convs + 1 FC on 40x40 inputs, every conv scaled by ``width``."""

from __future__ import annotations

import torch
from torch import nn

from expcuda.models.config import ModelConfig
from expcuda.models.layers import LayerFactory


class SVHNNet(nn.Module):
    """conv0 48 5x5 valid + pool 2 (FP) | 64, 64 3x3 same + pool 3/2 | 128 3x3 valid, 128 same,
    128 valid | 512 5x5 valid | FC: 40 -> 36 -> 18 -> 9 -> 7 -> 5 -> 1 pixels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make = LayerFactory(cfg)
        w = make.width
        self.stem = make.stem(cfg.in_channels, w(48), 5, pool=nn.MaxPool2d(2))
        c = w(48)
        specs = [  # (out, kernel, padding, pool)
            (64, 3, 1, None), (64, 3, 1, lambda: nn.MaxPool2d(3, 2, padding=1)),
            (128, 3, 0, None), (128, 3, 1, None), (128, 3, 0, None), (512, 5, 0, None)]
        blocks = []
        for out, k, pad, pool in specs:
            block, c = make.conv(c, w(out), k, padding=pad, pool=pool() if pool else None)
            blocks.append(block)
        self.features = nn.Sequential(*blocks)
        self.fc = make.head(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(self.stem(x)), 1))
