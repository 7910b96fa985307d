"""Residual nets for the second paper's experiments: PreResNet-20 (CIFAR) and ResNet-18 (ImageNet).

Each 3x3 conv is a low-precision block: the first of a residual block with
its activation, the second ending at its BatchNorm (``activation=False``),
since the residual add comes before the next nonlinearity. Projection
shortcuts are low-precision 1x1 blocks without activation too; only the first
conv and the last FC are full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from expcuda.models.config import ModelConfig
from expcuda.models.layers import LayerFactory


class PreActBlock(nn.Module):
    """x -> BN, phi, Qa -> conv-BN-phi-Qa -> conv-BN, plus the (projected) shortcut."""

    def __init__(self, make: LayerFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), make.act())
        self.conv1, mid = make.conv(cin, cout, 3, stride, 1)
        self.conv2, _ = make.conv(mid, cout, 3, 1, 1, activation=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut, _ = make.conv(cin, cout, 1, stride, 0, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre(x)
        short = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(self.conv1(out)) + short


class BasicBlock(nn.Module):
    """x -> conv-BN-phi-Qa -> conv-BN, plus the (projected) shortcut, then phi-Qa."""

    def __init__(self, make: LayerFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, mid = make.conv(cin, cout, 3, stride, 1)
        self.conv2, _ = make.conv(mid, cout, 3, 1, 1, activation=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut, _ = make.conv(cin, cout, 1, stride, 0, activation=False)
        self.act = make.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.conv2(self.conv1(x)) + short)


class PreResNet20(nn.Module):
    """3x3 conv 16*width (FP), three stages of 3 pre-activation blocks (16, 32, 64), BN-ReLU, pool, FC."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make = LayerFactory(cfg)
        c = make.width(16)
        self.stem = nn.Conv2d(cfg.in_channels, c, 3, 1, 1, bias=False)
        blocks = []
        for stage, base in enumerate((16, 32, 64)):
            for i in range(3):
                out = make.width(base)
                blocks.append(PreActBlock(make, c, out, 2 if stage > 0 and i == 0 else 1))
                c = out
        self.features = nn.Sequential(*blocks)
        self.post = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.fc = make.head(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.post(self.features(self.stem(x))), 1))


class ResNet18(nn.Module):
    """7x7/2 conv 64 + max-pool (FP), four stages of 2 basic blocks (64..512), pool, FC."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make = LayerFactory(cfg)
        c = make.width(64)
        self.stem = make.stem(cfg.in_channels, c, 7, stride=2, padding=3, pool=None)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        blocks = []
        for stage, base in enumerate((64, 128, 256, 512)):
            for i in range(2):
                out = make.width(base)
                blocks.append(BasicBlock(make, c, out, 2 if stage > 0 and i == 0 else 1))
                c = out
        self.features = nn.Sequential(*blocks)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = make.head(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avg(self.features(self.pool(self.stem(x)))), 1))
