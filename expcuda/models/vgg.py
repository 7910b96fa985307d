"""VGG-16 with BatchNorm after every conv, for 32x32 inputs (the paper's CIFAR model)."""

from __future__ import annotations

import torch
from torch import nn

from expcuda.models.config import ModelConfig
from expcuda.models.layers import LayerFactory

# 13 convs; "M" is a 2x2 max-pool, placed inside the conv block before it.
PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """Conv 1 full precision, convs 2-13 low precision (LP layers 1-12), one FC 512*width -> classes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make = LayerFactory(cfg)
        convs = [v for v in PLAN if v != "M"]
        pool_after, j = set(), -1  # indices of the convs a pool follows
        for v in PLAN:
            if v == "M":
                pool_after.add(j)
            else:
                j += 1
        c = make.width(convs[0])
        self.stem = make.stem(cfg.in_channels, c, 3, padding=1, pool=nn.MaxPool2d(2) if 0 in pool_after else None)
        blocks = []
        for j, out in enumerate(convs[1:], start=1):
            block, c = make.conv(c, make.width(out), 3, padding=1, pool=nn.MaxPool2d(2) if j in pool_after else None)
            blocks.append(block)
        self.features = nn.Sequential(*blocks)
        self.fc = make.head(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(self.stem(x)), 1))
